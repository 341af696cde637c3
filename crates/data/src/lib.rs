//! Corpus loading for weightstream: text or token files in, GPT-2 token ids
//! and training/evaluation windows out.
//!
//! What it does:
//! - `Tokenizer`: GPT-2 BPE (tiktoken's `r50k_base`, compiled in, offline);
//! - `load_tokens`: a `.bin` token file (nanoGPT raw uint16 or llm.c) or a
//!   UTF-8 text file, tokenized in parallel and cached by content hash;
//!   `write_tokens_bin` and `check_vocab` around it;
//! - `split`, `sample_batch`, `eval_windows`, `window`: the train/validation
//!   cut and the deterministic windows the trainer feeds the model.
//!
//! What it does not: know the model, the optimizer or the step loop; log or
//! print; download anything.
//!
//! Invariants: ids are `u16` on disk and in memory (GPT-2 has 50257); a batch
//! is a pure function of (tokens, B, T, seed, stream, index); operating errors
//! are `DataError`s with a one-line actionable message, caller bugs are
//! assertions.

mod batch;
mod error;
mod tokenizer;
mod tokens;

pub use batch::{eval_windows, sample_batch, split, window, Split};
pub use error::DataError;
pub use tokenizer::Tokenizer;
pub use tokens::{check_vocab, load_tokens, write_tokens_bin};

/// `<|endoftext|>`, GPT-2's document separator (same as `Tokenizer::EOT`).
pub const EOT: u32 = Tokenizer::EOT;
