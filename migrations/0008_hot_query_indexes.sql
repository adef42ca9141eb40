-- Indexes that serve every hot query at fleet scale (checked by EXPLAIN in the
-- integration suite against 10k rows). The partial "live" indexes do not serve lookups
-- that include revoked or deleted rows.

-- api_keys::all_for_resource: every key (revoked too) of a resource, oldest first.
CREATE INDEX api_keys_k8s_ref ON api_keys (k8s_namespace, k8s_name, created_at);
-- api_keys::all_for_customer: every key (revoked too) of a customer.
CREATE INDEX api_keys_customer ON api_keys (customer_id);
-- api_keys::next_clock_change: the next expiry or end of grace among live keys.
CREATE INDEX api_keys_next_clock_change ON api_keys ((least(expires_at, grace_until)))
    WHERE revoked_at IS NULL;
-- customers::latest_by_k8s_ref: a resource's newest record, deleted or not.
CREATE INDEX customers_k8s_ref ON customers (k8s_namespace, k8s_name, created_at DESC);
