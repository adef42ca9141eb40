-- Subscriptions: the system of record for the Subscription resource. A row exists once
-- the subscription is in force ('active'); cancelling keeps it for history ('cancelled').
CREATE TABLE subscriptions (
    id                  uuid PRIMARY KEY,
    customer_id         uuid        NOT NULL,
    plan                text        NOT NULL,
    monthly_requests    bigint      NOT NULL CHECK (monthly_requests >= 0),
    requests_per_second integer     NOT NULL CHECK (requests_per_second >= 0),
    status              text        NOT NULL,
    k8s_namespace       text        NOT NULL,
    k8s_name            text        NOT NULL,
    k8s_uid             text        NOT NULL,
    generation          bigint      NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    cancelled_at        timestamptz
);
-- Identity survives lost status: a re-applied resource finds its live row by namespace/name.
CREATE UNIQUE INDEX subscriptions_live_k8s_ref ON subscriptions (k8s_namespace, k8s_name)
    WHERE cancelled_at IS NULL;
-- At most one subscription in force per customer, whatever the controllers decide.
-- No foreign key to customers: a customer row may be deleted (or re-created) while its
-- subscription is still being cancelled.
CREATE UNIQUE INDEX subscriptions_active_customer ON subscriptions (customer_id)
    WHERE cancelled_at IS NULL;
