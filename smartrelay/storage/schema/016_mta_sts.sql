-- MTA-STS (RFC 8461, docs/delivery.md "MTA-STS"): the policy last fetched for each recipient
-- domain, kept until it expires (max_age) so that a restart or another node uses it too.
CREATE TABLE mta_sts_policies (
    domain TEXT PRIMARY KEY,
    policy_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    mx TEXT NOT NULL,            -- the mx patterns, one per line
    max_age BIGINT NOT NULL,     -- seconds
    fetched_at BIGINT NOT NULL,  -- ms
    expires_at BIGINT NOT NULL,  -- ms
    policy_text TEXT NOT NULL
);

-- TLS results per policy domain per UTC day, ready for TLS-RPT (RFC 8460) daily reports:
-- result is `success` or an RFC 8460 result type (certificate-host-mismatch,
-- starttls-not-supported, validation-failure, sts-policy-fetch-error, ...); mx_host is the
-- receiving MX ('' for a policy fetch); detail the last failure's text.
CREATE TABLE tls_report_results (
    day TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    policy_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    result TEXT NOT NULL,
    mx_host TEXT NOT NULL,
    sessions BIGINT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (day, policy_domain, policy_id, result, mx_host)
);
