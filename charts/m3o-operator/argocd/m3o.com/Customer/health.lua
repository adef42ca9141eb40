-- Argo CD health of an m3o.com resource (Customer, Subscription, ApiKey; the three
-- copies are identical). It reads the Ready condition the operator writes:
--   Healthy      Ready=True at the current generation (reasons Provisioned, and
--                Blocked for a key blocked on purpose or by a banned customer)
--   Progressing  no status yet, a generation the operator has not observed, Ready
--                Unknown, or reason Provisioning, CustomerNotReady or Deleting
--   Degraded     any other Ready=False (Conflict, UnknownPlan, CustomerNotFound,
--                DatabaseUnavailable, ConfigStoreUnavailable, Expired, ...), with
--                the operator's message
-- Argo CD runs custom health checks without Lua's string library, so this script
-- uses only the base library.
local hs = {}

local function describe(condition)
  local reason = condition.reason or "Unknown"
  if condition.message ~= nil and condition.message ~= "" then
    return reason .. ": " .. condition.message
  end
  return reason
end

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "Deleting: waiting for the operator to clean up the external records"
  return hs
end

if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local ready = nil
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Ready" then
    ready = condition
  end
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or describe(ready)
  return hs
end

local progressing = { Provisioning = true, CustomerNotReady = true, Deleting = true }
if ready.status ~= "False" or progressing[ready.reason] then
  hs.status = "Progressing"
  hs.message = describe(ready)
  return hs
end

hs.status = "Degraded"
hs.message = describe(ready)
return hs
