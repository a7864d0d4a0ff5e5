-- Secret environment values (README, "Secrets"): a job's `secretEnv` and a
-- task's `secretEnvironment`, sealed with ChaCha20-Poly1305 under the key
-- `secrets.key`. Each column holds base64(nonce || ciphertext) of the JSON
-- map, so these rows, and the `data_change` copies of them, never hold the
-- clear values. NULL: no secrets. A job fired from a task gets the task's
-- value as it is.
ALTER TABLE jobs ADD COLUMN secret_env text;
ALTER TABLE tasks ADD COLUMN secret_environment text;
