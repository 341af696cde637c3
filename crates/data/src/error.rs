//! The one error type of `ws-data`.
//!
//! What it does: names every operating error of loading and splitting a
//! corpus (missing or unreadable file, malformed token file, text that is not
//! UTF-8, tokens outside the vocabulary, a corpus too short for the model), each
//! with structured fields and a one-line message that says what is wrong and
//! what the user can do about it.
//!
//! What it does not: describe broken invariants of the caller (a batch asked
//! of a slice that is too short, a window index past the end); those are
//! `assert!`s in the functions themselves.
//!
//! Invariant: every message is a single line (no `\n`), so it reads well as
//! the last line of a CLI run and in a log.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "data file {} not found: pass --set data.path=FILE (a text file or a uint16 .bin token file)",
        path.display()
    )]
    NotFound { path: PathBuf },

    #[error("cannot read {}: {source}: check the path and its permissions", path.display())]
    Read { path: PathBuf, source: std::io::Error },

    #[error(
        "cannot write {}: {source}: check that the directory is writable and the disk has free space",
        path.display()
    )]
    Write { path: PathBuf, source: std::io::Error },

    #[error("data file {} is empty: pass a non-empty text file or .bin token file", path.display())]
    Empty { path: PathBuf },

    #[error(
        "token file {} has an odd length ({bytes} bytes), so it is not uint16 tokens: regenerate it as raw little-endian uint16 (nanoGPT) or in llm.c's format",
        path.display()
    )]
    OddLength { path: PathBuf, bytes: u64 },

    #[error(
        "token file {} starts with the llm.c magic but is only {bytes} bytes, shorter than its 1024-byte header: the file is truncated; regenerate it",
        path.display()
    )]
    LlmcHeaderTruncated { path: PathBuf, bytes: u64 },

    #[error(
        "token file {} has llm.c header version {version}, but only version 1 (uint16 GPT-2 tokens) is supported: regenerate it with llm.c's GPT-2 data scripts",
        path.display()
    )]
    LlmcVersion { path: PathBuf, version: i32 },

    #[error(
        "token file {}: its llm.c header says {count} tokens ({bytes_expected} bytes with the header) but the file has {bytes} bytes: the file is truncated or corrupt; regenerate it",
        path.display()
    )]
    LlmcCount { path: PathBuf, count: i64, bytes_expected: u64, bytes: u64 },

    #[error(
        "data file {} is not UTF-8 text (invalid byte at offset {offset}): convert it to UTF-8, or pass a uint16 token file whose name ends in .bin",
        path.display()
    )]
    NotUtf8 { path: PathBuf, offset: usize },

    #[error(
        "token cache {} is corrupt ({bytes} bytes, not a whole non-empty number of uint16 tokens): delete it and run again",
        path.display()
    )]
    CacheCorrupt { path: PathBuf, bytes: u64 },

    #[error(
        "cannot build the GPT-2 BPE tokenizer: {reason}: its vocabulary is compiled in, so this is a build problem; rebuild, and report it if it persists"
    )]
    Tokenizer { reason: String },

    #[error(
        "token {id} at position {position} is outside the model's vocabulary of {vocab_size}: the data was made with another tokenizer; retokenize it with GPT-2 BPE or raise model.vocab_size"
    )]
    VocabOverflow { id: u16, position: usize, vocab_size: usize },

    #[error(
        "data.val_fraction is {val_fraction}, but it must be strictly between 0 and 1: pass e.g. --set data.val_fraction=0.1"
    )]
    ValFraction { val_fraction: f64 },

    #[error(
        "data has {tokens} tokens; training needs at least {tokens_needed} (seq+1 = {window} for each of train and validation split): use a longer file or a shorter model.block_size"
    )]
    TooFewTokens { tokens: usize, tokens_needed: usize, window: usize },
}
