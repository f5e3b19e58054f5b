-- Each site's cap on the memory one job's script may hold, in bytes
-- (0: the runner's own cap).
ALTER TABLE sites ADD COLUMN script_memory BIGINT NOT NULL DEFAULT 0;
