-- Placeholder: schema version 15 is reserved for the sandbox credentials of issue 18 (built on
-- another branch). Deltas must be numbered 1..N; the real 015 replaces this file at the merge.
SELECT 1;
