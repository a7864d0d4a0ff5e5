//! Secret environment values (README, "Secrets"): a job's `secretEnv` and a
//! task's `secretEnvironment` are sealed with ChaCha20-Poly1305 under the
//! key `secrets.key` before they are stored, so the `jobs` and `tasks`
//! rows, and the `data_change` copies of them, hold only
//! `base64(nonce || ciphertext)` of the JSON map. The worker opens them at
//! claim time, hands the values to the job's environment, and masks them in
//! the captured output. Answers show the names with `***` for each value.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use serde_json::Value;

/// What a secret value is shown as, in answers and in captured output.
pub const MASK: &str = "***";

/// The name shown in place of secret names that cannot be read (the
/// configured key is missing or is not the one that sealed them).
pub const UNREADABLE: &str = "*";

/// The length of a ChaCha20-Poly1305 nonce, in bytes.
const NONCE_LEN: usize = 12;

/// The length of `secrets.key` once base64-decoded, in bytes.
pub const KEY_LEN: usize = 32;

/// The key that seals secret values (`secrets.key`). Its `Debug` never
/// shows the key.
#[derive(Clone)]
pub struct SecretKey([u8; KEY_LEN]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

/// Secret values as a request carries them (`secretEnv`,
/// `secretEnvironment`): a name → value map whose `Debug` shows the names
/// only, so a request logged by mistake does not print them.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SecretValues(pub BTreeMap<String, String>);

impl std::fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, MASK)))
            .finish()
    }
}

impl From<BTreeMap<String, String>> for SecretValues {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self(map)
    }
}

/// Why sealed secrets could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// No `secrets.key` is configured here.
    #[error(
        "secrets.key (TASKHOST__SECRETS__KEY) is not configured here, so the secret values cannot be decrypted"
    )]
    NoKey,
    /// The stored value is not base64, or too short to hold a nonce.
    #[error("the stored secret values are damaged (not base64(nonce || ciphertext))")]
    Damaged,
    /// The key is not the one that sealed the values (or they were changed).
    #[error(
        "the secret values cannot be decrypted with the configured secrets.key (it is not the key that encrypted them, or the stored value was altered)"
    )]
    WrongKey,
}

impl SecretKey {
    /// Parses `secrets.key`: empty means no key; otherwise it must be
    /// standard base64 of exactly 32 bytes. The error never repeats the key.
    pub fn parse(text: &str) -> Result<Option<Self>, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let bytes = STANDARD
            .decode(text)
            .map_err(|_| "is not base64".to_owned())?;
        let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            format!(
                "decodes to {} bytes; it must be base64 of exactly {KEY_LEN}",
                bytes.len()
            )
        })?;
        Ok(Some(Self(key)))
    }

    /// A key from raw bytes (tests, tools).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(&Key::from(self.0))
    }

    /// Seals `values` (as JSON) under a fresh random nonce:
    /// `base64(nonce || ciphertext)`.
    pub fn seal(&self, values: &BTreeMap<String, String>) -> String {
        let plain = serde_json::to_vec(values).unwrap_or_default();
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        // Encrypting into a Vec cannot fail for inputs of this size.
        let sealed = self
            .cipher()
            .encrypt(&Nonce::from(nonce), plain.as_slice())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        STANDARD.encode(out)
    }

    /// Opens what [`SecretKey::seal`] made.
    pub fn open(&self, sealed: &str) -> Result<BTreeMap<String, String>, SecretError> {
        let bytes = STANDARD
            .decode(sealed.trim())
            .map_err(|_| SecretError::Damaged)?;
        if bytes.len() < NONCE_LEN {
            return Err(SecretError::Damaged);
        }
        let (nonce, body) = bytes.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SecretError::Damaged)?;
        let plain = self
            .cipher()
            .decrypt(&Nonce::from(nonce), body)
            .map_err(|_| SecretError::WrongKey)?;
        serde_json::from_slice(&plain).map_err(|_| SecretError::WrongKey)
    }

    /// A hash of `bytes` keyed with this key: SHA-256(key || bytes), hex.
    /// An idempotency hash of a body that holds secret values is taken this
    /// way, so the stored hash cannot be used to guess them offline.
    pub fn keyed_hash(&self, bytes: &[u8]) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(bytes);
        hex::encode(h.finalize())
    }
}

/// Opens `sealed` with `key`, or says why not.
pub fn open(
    key: Option<&SecretKey>,
    sealed: &str,
) -> Result<BTreeMap<String, String>, SecretError> {
    key.ok_or(SecretError::NoKey)?.open(sealed)
}

/// What an answer shows for stored secrets: each name with `***`, or
/// `{"*": "***"}` when the names cannot be read with `key`.
pub fn masked(key: Option<&SecretKey>, sealed: &str) -> Value {
    let names: Vec<String> = match open(key, sealed) {
        Ok(values) => values.into_keys().collect(),
        Err(_) => vec![UNREADABLE.to_owned()],
    };
    Value::Object(
        names
            .into_iter()
            .map(|n| (n, Value::String(MASK.to_owned())))
            .collect(),
    )
}

/// Replaces the sealed secrets of a decoded row's `column` (a JSON string)
/// with their masked names, as [`masked`] shows them (change feed answers).
pub fn mask_row_column(row: &mut Value, column: &str, key: Option<&SecretKey>) {
    if let Some(slot) = row.get_mut(column)
        && let Some(sealed) = slot.as_str()
    {
        *slot = masked(key, sealed);
    }
}

/// The byte strings [`mask_output`] hides for `values`: each non-empty
/// value, and each non-empty line of a value of several lines (a key
/// printed line by line), longest first.
pub fn mask_patterns<'a>(values: impl IntoIterator<Item = &'a String>) -> Vec<Vec<u8>> {
    let mut patterns: Vec<Vec<u8>> = Vec::new();
    for value in values {
        if value.is_empty() {
            continue;
        }
        patterns.push(value.as_bytes().to_vec());
        if value.contains('\n') {
            patterns.extend(
                value
                    .lines()
                    .map(|l| l.trim_end_matches('\r'))
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| l.as_bytes().to_vec()),
            );
        }
    }
    patterns.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    patterns.dedup();
    patterns
}

/// `output` with every occurrence of each pattern (see [`mask_patterns`])
/// replaced by `***`, like GitHub Actions log masking. A value the command
/// transformed (base64'd, reversed, split across writes that were cut by
/// the output cap) is not recognised.
pub fn mask_output(output: &[u8], patterns: &[Vec<u8>]) -> Vec<u8> {
    if patterns.is_empty() || output.is_empty() {
        return output.to_vec();
    }
    let mut out = Vec::with_capacity(output.len());
    let mut i = 0;
    'scan: while i < output.len() {
        for p in patterns {
            if output[i..].starts_with(p) {
                out.extend_from_slice(MASK.as_bytes());
                i += p.len();
                continue 'scan;
            }
        }
        out.push(output[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SecretKey {
        SecretKey::from_bytes([byte; KEY_LEN])
    }

    fn values() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("TOKEN".to_owned(), "s3cr3t-value".to_owned()),
            ("EMPTY".to_owned(), String::new()),
        ])
    }

    #[test]
    fn seal_then_open_round_trips_and_hides_the_values() {
        let k = key(7);
        let sealed = k.seal(&values());
        assert!(!sealed.contains("s3cr3t"), "{sealed}");
        assert!(!sealed.contains("TOKEN"), "names are sealed too: {sealed}");
        assert_eq!(k.open(&sealed).unwrap(), values());
        // A fresh nonce each time: the same values seal differently.
        assert_ne!(k.seal(&values()), sealed);
    }

    #[test]
    fn a_wrong_key_or_a_damaged_value_is_an_error_not_a_panic() {
        let sealed = key(1).seal(&values());
        assert_eq!(key(2).open(&sealed), Err(SecretError::WrongKey));
        assert_eq!(key(1).open("not base64!"), Err(SecretError::Damaged));
        assert_eq!(key(1).open("AAAA"), Err(SecretError::Damaged));
        let mut bytes = STANDARD.decode(&sealed).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(
            key(1).open(&STANDARD.encode(bytes)),
            Err(SecretError::WrongKey)
        );
        assert_eq!(open(None, &sealed), Err(SecretError::NoKey));
    }

    #[test]
    fn the_key_must_be_base64_of_32_bytes_and_is_never_repeated() {
        assert!(SecretKey::parse("").unwrap().is_none());
        assert!(SecretKey::parse("  ").unwrap().is_none());
        let good = STANDARD.encode([9u8; 32]);
        assert!(SecretKey::parse(&good).unwrap().is_some());
        let short = STANDARD.encode([9u8; 16]);
        let e = SecretKey::parse(&short).unwrap_err();
        assert!(e.contains("16 bytes") && !e.contains(&short), "{e}");
        let e = SecretKey::parse("hunter2!!").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert_eq!(format!("{:?}", key(3)), "SecretKey(***)");
        let shown = format!("{:?}", SecretValues(values()));
        assert!(
            shown.contains("TOKEN") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }

    #[test]
    fn answers_show_names_only() {
        let k = key(4);
        let sealed = k.seal(&values());
        assert_eq!(
            masked(Some(&k), &sealed),
            serde_json::json!({"EMPTY": "***", "TOKEN": "***"})
        );
        assert_eq!(
            masked(Some(&key(5)), &sealed),
            serde_json::json!({"*": "***"})
        );
        let mut row = serde_json::json!({"secret_env": sealed, "env": {}});
        mask_row_column(&mut row, "secret_env", Some(&k));
        assert_eq!(
            row["secret_env"],
            serde_json::json!({"EMPTY": "***", "TOKEN": "***"})
        );
    }

    #[test]
    fn output_masking_hides_every_occurrence_and_lines_of_multiline_values() {
        let secrets = [
            "s3cr3t".to_owned(),
            String::new(),
            "line-one\nline-two".to_owned(),
        ];
        let p = mask_patterns(&secrets);
        assert_eq!(
            mask_output(b"a s3cr3t b s3cr3ts3cr3t\n", &p),
            b"a *** b ******\n"
        );
        assert_eq!(mask_output(b"line-two\n", &p), b"***\n");
        assert_eq!(mask_output(b"line-one\nline-two", &p), b"***");
        assert_eq!(mask_output(b"nothing here", &p), b"nothing here");
        assert_eq!(mask_output(b"", &p), b"");
    }
}
