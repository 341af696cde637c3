//! The GPT-2 byte-pair encoding (tiktoken's `r50k_base`), compiled in so it
//! works offline.
//!
//! What it does: turns ordinary text into GPT-2 token ids and back, and
//! tokenizes a large text on several threads with exactly the ids that one
//! thread would give.
//!
//! What it does not: special tokens. `encode` treats `<|endoftext|>` in the
//! text as ordinary characters, so a corpus cannot inject control tokens; no
//! `EOT` is added between documents (the corpus is one stream).
//!
//! Invariants:
//! - every id `encode` returns is below `Tokenizer::VOCAB_SIZE` (50257), so it
//!   fits a `u16`;
//! - `encode_parallel(text)` == `encode(text)` for every text (see
//!   `chunk_boundaries` for why the split points make this exact).

use crate::DataError;

/// Byte count below which a text is tokenized on the calling thread: spawning
/// threads for less does not pay.
const PARALLEL_CHUNK_BYTES_MIN: usize = 1 << 20;
/// Most threads one `encode_parallel` call spawns.
const PARALLEL_THREADS_MAX: usize = 16;

/// GPT-2's tokenizer. Cheap to share across threads (`&Tokenizer` is `Sync`);
/// building one parses the 50k-entry vocabulary, so build it once.
#[derive(Clone)]
pub struct Tokenizer {
    bpe: tiktoken_rs::CoreBPE,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokenizer(gpt2 r50k_base)")
    }
}

impl Tokenizer {
    /// `<|endoftext|>`, the document separator of GPT-2.
    pub const EOT: u32 = 50256;
    /// Number of ids GPT-2 uses: 50256 merges and bytes, plus `EOT`.
    pub const VOCAB_SIZE: usize = 50257;

    pub fn gpt2() -> Result<Tokenizer, DataError> {
        let bpe = tiktoken_rs::r50k_base()
            .map_err(|error| DataError::Tokenizer { reason: error.to_string().replace('\n', " ") })?;
        Ok(Tokenizer { bpe })
    }

    /// Token ids of `text`, no special tokens (see the module header).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.bpe.encode_ordinary(text)
    }

    /// Text of `ids`. Lossy: a sequence that ends inside a multi-byte
    /// character (common when decoding a few sampled tokens) or an id outside
    /// the vocabulary becomes U+FFFD instead of an error, because decoding is
    /// for display.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            match self.bpe.decode_bytes(&[id]) {
                Ok(token_bytes) => bytes.extend_from_slice(&token_bytes),
                Err(_) => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Same ids as `encode(text)`, computed on up to
    /// `min(available cores, PARALLEL_THREADS_MAX)` threads, one chunk each.
    pub fn encode_parallel(&self, text: &str) -> Vec<u32> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunks = cores.min(PARALLEL_THREADS_MAX).min(text.len() / PARALLEL_CHUNK_BYTES_MIN).max(1);
        self.encode_chunks(text, &chunk_boundaries(text, chunks))
    }

    /// Tokenizes `text[boundaries[k]..boundaries[k+1]]` on its own thread
    /// (the first on this one) and concatenates the ids in order.
    fn encode_chunks(&self, text: &str, boundaries: &[usize]) -> Vec<u32> {
        assert!(boundaries.len() >= 2);
        assert_eq!(boundaries[0], 0);
        assert_eq!(boundaries[boundaries.len() - 1], text.len());
        assert!(boundaries.windows(2).all(|w| w[0] <= w[1]));
        if boundaries.len() == 2 {
            return self.encode(text);
        }
        let chunk = |k: usize| &text[boundaries[k]..boundaries[k + 1]];
        let chunk_count = boundaries.len() - 1;
        std::thread::scope(|scope| {
            let handles: Vec<_> = (1..chunk_count).map(|k| scope.spawn(move || self.encode(chunk(k)))).collect();
            let mut ids = self.encode(chunk(0));
            for handle in handles {
                // A panic inside the tokenizer is a bug; re-raise it here.
                let chunk_ids = handle.join().unwrap_or_else(|payload| std::panic::resume_unwind(payload));
                ids.extend_from_slice(&chunk_ids);
            }
            ids
        })
    }
}

/// Split points that cut `text` into at most `chunks` pieces of roughly equal
/// size, returned as `[0, p1, .., text.len()]`.
///
/// Each split point `p` sits at a paragraph break: `text[p..]` starts with
/// `"\n\n"` and `text[p - 1]` is a printable ASCII character (not whitespace).
/// The separator goes to the *following* chunk, unlike nanoGPT-like pipelines
/// that keep it on the preceding one, because this choice is exact: GPT-2's
/// pre-tokenizer pattern (`'s|..| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|
/// \s++$|\s+(?!\S)|\s`) never joins a non-space character with the whitespace
/// after it, has no look-behind, and its only look-aheads (`$`, `(?!\S)`) see
/// the same answer at `p` whether the text ends there or continues with
/// whitespace. So whole-text tokenization has a piece boundary at `p`, and the
/// pieces on either side are the same when the halves are tokenized apart.
/// Keeping `"\n\n"` on the preceding chunk would instead turn the whole-text
/// pieces `"\n", "\n"` (ids 198, 198) into one `"\n\n"` (id 628) at each cut.
/// A text without such breaks stays one chunk.
fn chunk_boundaries(text: &str, chunks: usize) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut boundaries = vec![0];
    for k in 1..chunks.max(1) {
        let target = (k * bytes.len() / chunks).max(boundaries[boundaries.len() - 1] + 1);
        match paragraph_break_at_or_after(bytes, target) {
            Some(p) => boundaries.push(p),
            None => break,
        }
    }
    boundaries.push(bytes.len());
    boundaries
}

/// First `p >= from` with `bytes[p..]` starting `"\n\n"` and `bytes[p - 1]`
/// printable ASCII. `p` is a char boundary because `bytes[p]` is ASCII.
fn paragraph_break_at_or_after(bytes: &[u8], from: usize) -> Option<usize> {
    let mut p = from.max(1);
    while p + 1 < bytes.len() {
        if bytes[p] == b'\n' && bytes[p + 1] == b'\n' && bytes[p - 1].is_ascii_graphic() {
            return Some(p);
        }
        p += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        Tokenizer::gpt2().expect("the GPT-2 vocabulary is compiled in")
    }

    #[test]
    fn hello_world_is_gpt2_ids_31373_995() {
        assert_eq!(tokenizer().encode("hello world"), vec![31373, 995]);
    }

    #[test]
    fn unicode_text_round_trips() {
        let tokenizer = tokenizer();
        let text = "Ünïcödé — 日本語のテキスト, emoji 🦀🚀, and \"quotes\"\n\n\ttabs.";
        let ids = tokenizer.encode(text);
        assert!(ids.iter().all(|&id| (id as usize) < Tokenizer::VOCAB_SIZE));
        assert_eq!(tokenizer.decode(&ids), text);
    }

    #[test]
    fn special_token_text_is_ordinary_text() {
        let tokenizer = tokenizer();
        let ids = tokenizer.encode("a<|endoftext|>b");
        assert!(!ids.contains(&Tokenizer::EOT));
        assert_eq!(tokenizer.decode(&[Tokenizer::EOT]), "<|endoftext|>");
    }

    #[test]
    fn decode_of_a_partial_character_or_unknown_id_is_lossy_not_an_error() {
        let tokenizer = tokenizer();
        let ids = tokenizer.encode("🦀");
        assert!(ids.len() > 1, "the crab is several byte tokens");
        assert!(tokenizer.decode(&ids[..1]).contains('\u{FFFD}'));
        assert_eq!(tokenizer.decode(&[60_000]), "\u{FFFD}");
    }

    #[test]
    fn paragraph_separators_go_to_the_following_chunk() {
        let text = "one.\n\ntwo \n\nthree\n\n\nfour";
        // "two \n\n" is preceded by a space, so it is not a split point.
        let boundaries = chunk_boundaries(text, 8);
        assert_eq!(boundaries, vec![0, 4, 17, text.len()]);
        assert!(text[4..].starts_with("\n\ntwo"));
        assert!(text[17..].starts_with("\n\n\nfour"));
    }

    #[test]
    fn chunked_encoding_equals_whole_text_encoding() {
        let tokenizer = tokenizer();
        let mut text = String::new();
        let paragraphs = [
            "First Citizen:\nBefore we proceed any further, hear me speak.",
            "  Indented line with trailing spaces   ",
            "Numbers 12345 and 3.14159, it's 'quoted', they'll, we've.",
            "日本語の段落。",
            "\r\nWindows line ends\r\n\r\nstay put.",
            "a\n\n\n\nb",
            "<|endoftext|>",
            "emoji 🦀.",
        ];
        for round in 0..20 {
            for (i, paragraph) in paragraphs.iter().enumerate() {
                text.push_str(paragraph);
                text.push_str(if (round + i) % 3 == 0 { "\n\n\n" } else { "\n\n" });
            }
        }
        let whole = tokenizer.encode(&text);
        for chunks in [2, 3, 7, 50, 1000] {
            let boundaries = chunk_boundaries(&text, chunks);
            assert!(boundaries.len() > 2, "the text must actually be split");
            assert_eq!(tokenizer.encode_chunks(&text, &boundaries), whole, "chunks={chunks}");
        }
    }

    #[test]
    fn separators_on_the_preceding_chunk_would_change_the_ids() {
        // The reason for the split rule above, pinned down.
        let tokenizer = tokenizer();
        assert_eq!(tokenizer.encode("a.\n\nb")[2..4], [198, 198]);
        assert_eq!(tokenizer.encode("a.\n\n")[2..], [628]);
    }

    #[test]
    fn text_without_paragraph_breaks_stays_one_chunk() {
        assert_eq!(chunk_boundaries("no breaks here", 4), vec![0, 14]);
        assert_eq!(chunk_boundaries("", 4), vec![0, 0]);
    }
}
