//! Token files: reading a corpus as GPT-2 token ids, writing and caching them.
//!
//! What it does:
//! - a path ending in `.bin` is a token file, in one of two layouts:
//!   nanoGPT's raw little-endian uint16 ids, or llm.c's (a header of 256
//!   little-endian int32: `[0]` the magic 20240520, `[1]` version 1, `[2]` the
//!   token count; then the uint16 ids). The layouts are told apart by the
//!   magic: as uint16 ids it reads 57544, 308, and 57544 is not a GPT-2 id, so
//!   no valid raw file starts that way;
//! - any other path is UTF-8 text, tokenized with GPT-2 BPE (on several
//!   threads, with exactly the single-thread ids; see `tokenizer.rs`). With a
//!   cache folder the ids are kept there as a nanoGPT `.bin` named
//!   `<file stem>-<first 16 hex of sha256(text bytes)>.bin`; a later call with
//!   the same text reads that file and does not tokenize.
//!
//! What it does not: add `EOT` between documents, check ids against a model's
//! vocabulary (`check_vocab` does that, at start-up), or memory-map (a corpus
//! is at most a few hundred MB of ids for this trainer).
//!
//! Invariants: every file is written to a temporary name in its destination
//! folder, synced, then renamed, so a reader sees either no file or a whole
//! one; every error is a `DataError` naming the file.

use crate::{DataError, Tokenizer};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const LLMC_MAGIC: i32 = 20240520;
const LLMC_VERSION: i32 = 1;
const LLMC_HEADER_BYTES: usize = 256 * 4;
/// Hex digits of the text's sha256 in a cache file name: 64 bits, enough to
/// tell a user's corpora apart.
const CACHE_HASH_HEX_DIGITS: usize = 16;

/// The corpus at `path` as token ids (see the module header for the formats).
pub fn load_tokens(path: &Path, cache_dir: Option<&Path>) -> Result<Vec<u16>, DataError> {
    let bytes = read_file(path)?;
    if bytes.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    if path.extension().is_some_and(|extension| extension == "bin") {
        return parse_bin(path, &bytes);
    }

    let cache_path = cache_dir.map(|dir| dir.join(cache_file_name(path, &bytes)));
    if let Some(cache_path) = &cache_path {
        if cache_path.is_file() {
            return read_cache(cache_path);
        }
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|error| DataError::NotUtf8 { path: path.to_path_buf(), offset: error.valid_up_to() })?;
    let tokenizer = Tokenizer::gpt2()?;
    let tokens: Vec<u16> = tokenizer
        .encode_parallel(text)
        .into_iter()
        .map(|id| {
            assert!((id as usize) < Tokenizer::VOCAB_SIZE, "GPT-2 id {id} out of range");
            id as u16
        })
        .collect();
    assert!(!tokens.is_empty(), "non-empty text has at least one token");

    if let Some(cache_path) = &cache_path {
        if let Some(dir) = cache_path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DataError::Write { path: dir.to_path_buf(), source })?;
        }
        write_tokens_bin(cache_path, &tokens)?;
    }
    Ok(tokens)
}

/// Writes `tokens` as a nanoGPT token file (raw little-endian uint16),
/// atomically: a temporary file in the same folder, synced, then renamed.
pub fn write_tokens_bin(path: &Path, tokens: &[u16]) -> Result<(), DataError> {
    let mut bytes = Vec::with_capacity(tokens.len() * 2);
    for token in tokens {
        bytes.extend_from_slice(&token.to_le_bytes());
    }
    write_atomic(path, &bytes)
}

/// Checks that every id is below `vocab_size`; the error names the first
/// that is not.
pub fn check_vocab(tokens: &[u16], vocab_size: usize) -> Result<(), DataError> {
    match tokens.iter().position(|&id| id as usize >= vocab_size) {
        None => Ok(()),
        Some(position) => Err(DataError::VocabOverflow { id: tokens[position], position, vocab_size }),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DataError::NotFound { path: path.to_path_buf() },
        _ => DataError::Read { path: path.to_path_buf(), source },
    })
}

/// A non-empty `.bin` in either layout.
fn parse_bin(path: &Path, bytes: &[u8]) -> Result<Vec<u16>, DataError> {
    assert!(!bytes.is_empty());
    let file_bytes = bytes.len() as u64;
    let starts_with_magic = bytes.len() >= 4 && read_i32_le(bytes, 0) == LLMC_MAGIC;
    if !starts_with_magic {
        return parse_raw(bytes).ok_or(DataError::OddLength { path: path.to_path_buf(), bytes: file_bytes });
    }

    if bytes.len() < LLMC_HEADER_BYTES {
        return Err(DataError::LlmcHeaderTruncated { path: path.to_path_buf(), bytes: file_bytes });
    }
    let version = read_i32_le(bytes, 1);
    if version != LLMC_VERSION {
        return Err(DataError::LlmcVersion { path: path.to_path_buf(), version });
    }
    let count = read_i32_le(bytes, 2) as i64;
    let bytes_expected = LLMC_HEADER_BYTES as u64 + 2 * count.max(0) as u64;
    if count <= 0 || bytes_expected != file_bytes {
        return Err(DataError::LlmcCount { path: path.to_path_buf(), count, bytes_expected, bytes: file_bytes });
    }
    let tokens = parse_raw(&bytes[LLMC_HEADER_BYTES..]).expect("length checked against the header");
    assert_eq!(tokens.len() as i64, count);
    Ok(tokens)
}

/// Little-endian uint16 ids, or `None` for an odd byte count.
fn parse_raw(bytes: &[u8]) -> Option<Vec<u16>> {
    if bytes.len() % 2 != 0 {
        return None;
    }
    let tokens = bytes.chunks_exact(2).map(|pair| u16::from_le_bytes([pair[0], pair[1]])).collect();
    Some(tokens)
}

fn read_i32_le(bytes: &[u8], index: usize) -> i32 {
    let at = index * 4;
    i32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn cache_file_name(text_path: &Path, text_bytes: &[u8]) -> String {
    let stem = text_path.file_stem().map_or_else(|| "data".to_string(), |stem| stem.to_string_lossy().into_owned());
    let digest = Sha256::digest(text_bytes);
    let hex: String = digest.iter().take(CACHE_HASH_HEX_DIGITS / 2).map(|byte| format!("{byte:02x}")).collect();
    format!("{stem}-{hex}.bin")
}

/// A cache file is one we wrote: raw ids of a non-empty text. Anything else
/// (truncated by a full disk before the rename existed, edited by hand) is
/// reported rather than re-tokenized silently.
fn read_cache(path: &Path) -> Result<Vec<u16>, DataError> {
    let bytes = read_file(path)?;
    match parse_raw(&bytes) {
        Some(tokens) if !tokens.is_empty() => Ok(tokens),
        _ => Err(DataError::CacheCorrupt { path: path.to_path_buf(), bytes: bytes.len() as u64 }),
    }
}

/// Distinguishes temporary files of concurrent writers in one process; the
/// process id distinguishes processes.
static TEMP_FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let file_name = path.file_name().map_or_else(|| "tokens".to_string(), |name| name.to_string_lossy().into_owned());
    let temp_name =
        format!(".{file_name}.tmp-{}-{}", std::process::id(), TEMP_FILE_COUNTER.fetch_add(1, Ordering::Relaxed));
    let temp_path: PathBuf = path.with_file_name(temp_name);
    let write_error = |source| DataError::Write { path: path.to_path_buf(), source };

    let written = (|| {
        let mut file = std::fs::File::create(&temp_path)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp_path, path)
    })();
    if let Err(source) = written {
        // Best effort: the error that matters is the write's, not the cleanup's.
        let _ = std::fs::remove_file(&temp_path);
        return Err(write_error(source));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!(
                "ws-data-test-{name}-{}-{}",
                std::process::id(),
                TEMP_FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("create a temp dir for the test");
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn llmc_file(tokens: &[u16], version: i32, count: i32) -> Vec<u8> {
        let mut header = [0i32; 256];
        header[0] = LLMC_MAGIC;
        header[1] = version;
        header[2] = count;
        let mut bytes: Vec<u8> = header.iter().flat_map(|word| word.to_le_bytes()).collect();
        bytes.extend(tokens.iter().flat_map(|token| token.to_le_bytes()));
        bytes
    }

    #[test]
    fn text_is_tokenized_once_then_read_from_the_cache() {
        let dir = TempDir::new("cache");
        let text_path = dir.0.join("story.txt");
        let text = "hello world\n\nOnce upon a time.";
        std::fs::write(&text_path, text).unwrap();
        let cache_dir = dir.0.join("cache");

        let first = load_tokens(&text_path, Some(&cache_dir)).unwrap();
        let expected: Vec<u16> = Tokenizer::gpt2().unwrap().encode(text).into_iter().map(|id| id as u16).collect();
        assert_eq!(first, expected);
        assert_eq!(&first[..2], &[31373, 995]);

        let digest = Sha256::digest(text.as_bytes());
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let cache_path = cache_dir.join(format!("story-{hex}.bin"));
        assert!(cache_path.is_file(), "cache file {} missing", cache_path.display());
        assert_eq!(load_tokens(&cache_path, None).unwrap(), first);
        let entries: Vec<_> = std::fs::read_dir(&cache_dir).unwrap().collect();
        assert_eq!(entries.len(), 1, "no temporary file is left behind");

        // Prove the second call reads the cache instead of tokenizing: plant
        // different ids there and get them back.
        write_tokens_bin(&cache_path, &[1, 2, 3]).unwrap();
        assert_eq!(load_tokens(&text_path, Some(&cache_dir)).unwrap(), vec![1, 2, 3]);

        // A changed text has another hash, hence another cache file.
        std::fs::write(&text_path, "hello world!").unwrap();
        assert_eq!(load_tokens(&text_path, Some(&cache_dir)).unwrap(), vec![31373, 995, 0]);
        assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 2);
    }

    #[test]
    fn text_without_a_cache_dir_writes_nothing() {
        let dir = TempDir::new("nocache");
        let text_path = dir.0.join("a.txt");
        std::fs::write(&text_path, "hello world").unwrap();
        assert_eq!(load_tokens(&text_path, None).unwrap(), vec![31373, 995]);
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    #[test]
    fn raw_and_llmc_bin_files_read_the_same_tokens() {
        let dir = TempDir::new("bin");
        let tokens: Vec<u16> = vec![31373, 995, 0, 50256, 7, 65535];
        let raw_path = dir.0.join("raw.bin");
        write_tokens_bin(&raw_path, &tokens).unwrap();
        let llmc_path = dir.0.join("llmc.bin");
        std::fs::write(&llmc_path, llmc_file(&tokens, 1, tokens.len() as i32)).unwrap();

        assert_eq!(load_tokens(&raw_path, None).unwrap(), tokens);
        assert_eq!(load_tokens(&llmc_path, None).unwrap(), tokens);
        assert_eq!(std::fs::read(&raw_path).unwrap().len(), 2 * tokens.len());
    }

    #[test]
    fn a_bin_file_ignores_the_cache_dir() {
        let dir = TempDir::new("bincache");
        let raw_path = dir.0.join("raw.bin");
        write_tokens_bin(&raw_path, &[5, 6]).unwrap();
        let cache_dir = dir.0.join("cache");
        assert_eq!(load_tokens(&raw_path, Some(&cache_dir)).unwrap(), vec![5, 6]);
        assert!(!cache_dir.exists());
    }

    #[test]
    fn malformed_llmc_headers_are_errors() {
        let dir = TempDir::new("llmc");
        let path = dir.0.join("bad.bin");
        let tokens = [1u16, 2, 3];

        std::fs::write(&path, llmc_file(&tokens, 2, 3)).unwrap();
        let error = load_tokens(&path, None).unwrap_err();
        assert!(matches!(error, DataError::LlmcVersion { version: 2, .. }), "{error}");

        std::fs::write(&path, llmc_file(&tokens, 1, 4)).unwrap();
        let error = load_tokens(&path, None).unwrap_err();
        assert!(matches!(error, DataError::LlmcCount { count: 4, bytes_expected: 1032, bytes: 1030, .. }), "{error}");

        std::fs::write(&path, llmc_file(&tokens, 1, -1)).unwrap();
        let error = load_tokens(&path, None).unwrap_err();
        assert!(matches!(error, DataError::LlmcCount { count: -1, .. }), "{error}");

        std::fs::write(&path, &llmc_file(&tokens, 1, 3)[..100]).unwrap();
        let error = load_tokens(&path, None).unwrap_err();
        assert!(matches!(error, DataError::LlmcHeaderTruncated { bytes: 100, .. }), "{error}");
    }

    #[test]
    fn odd_length_empty_and_missing_files_are_errors() {
        let dir = TempDir::new("errors");
        let odd = dir.0.join("odd.bin");
        std::fs::write(&odd, [1u8, 2, 3]).unwrap();
        let error = load_tokens(&odd, None).unwrap_err();
        assert!(matches!(error, DataError::OddLength { bytes: 3, .. }), "{error}");

        for name in ["empty.bin", "empty.txt"] {
            let empty = dir.0.join(name);
            std::fs::write(&empty, b"").unwrap();
            let error = load_tokens(&empty, Some(&dir.0)).unwrap_err();
            assert!(matches!(error, DataError::Empty { .. }), "{error}");
        }

        let missing = dir.0.join("missing.txt");
        let error = load_tokens(&missing, None).unwrap_err();
        assert!(matches!(&error, DataError::NotFound { path } if path == &missing), "{error}");
        let message = error.to_string();
        assert!(message.contains("missing.txt not found: pass --set data.path=FILE"), "{message}");
        assert!(!message.contains('\n'));

        let error = load_tokens(&dir.0, None).unwrap_err();
        assert!(matches!(error, DataError::Read { .. }), "{error}");
    }

    #[test]
    fn non_utf8_text_is_an_error_naming_the_offset() {
        let dir = TempDir::new("utf8");
        let path = dir.0.join("latin1.txt");
        std::fs::write(&path, b"caf\xe9 au lait").unwrap();
        let error = load_tokens(&path, Some(&dir.0.join("cache"))).unwrap_err();
        assert!(matches!(error, DataError::NotUtf8 { offset: 3, .. }), "{error}");
        assert!(!dir.0.join("cache").exists());
    }

    #[test]
    fn a_corrupt_cache_file_is_reported() {
        let dir = TempDir::new("corrupt");
        let text_path = dir.0.join("t.txt");
        std::fs::write(&text_path, "hello world").unwrap();
        let cache_dir = dir.0.join("cache");
        load_tokens(&text_path, Some(&cache_dir)).unwrap();
        let cache_path = std::fs::read_dir(&cache_dir).unwrap().next().unwrap().unwrap().path();
        std::fs::write(&cache_path, [1u8, 2, 3]).unwrap();
        let error = load_tokens(&text_path, Some(&cache_dir)).unwrap_err();
        assert!(matches!(error, DataError::CacheCorrupt { bytes: 3, .. }), "{error}");
    }

    #[test]
    fn writing_into_a_missing_folder_is_an_error() {
        let dir = TempDir::new("write");
        let path = dir.0.join("no-such-folder").join("t.bin");
        let error = write_tokens_bin(&path, &[1, 2]).unwrap_err();
        assert!(matches!(error, DataError::Write { .. }), "{error}");
    }

    #[test]
    fn check_vocab_names_the_first_id_out_of_range() {
        assert!(check_vocab(&[0, 50256, 17], 50257).is_ok());
        assert!(check_vocab(&[], 0).is_ok());
        let error = check_vocab(&[3, 50257, 60000], 50257).unwrap_err();
        assert!(matches!(error, DataError::VocabOverflow { id: 50257, position: 1, vocab_size: 50257 }), "{error}");
        assert!(error.to_string().starts_with("token 50257 at position 1 is outside"));
    }
}
