//! The bundled corpus end to end: token count and tokenization speed.
//!
//! What it does: tokenizes ../shared/data/shakespeare.txt (5,057,282 bytes)
//! through `load_tokens`, checks the count is plausible for GPT-2 BPE, checks
//! the parallel tokenization equals the single-thread one, and prints the
//! speed. What it does not: assert on time (machines differ). It skips with a
//! message when the shared data folder is absent (it is not in the project).

use std::path::Path;
use std::time::Instant;
use ws_data::{check_vocab, load_tokens, Tokenizer};

const SHAKESPEARE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/shakespeare.txt");

#[test]
fn shakespeare_tokenizes_to_a_plausible_count_and_matches_single_thread() {
    let path = Path::new(SHAKESPEARE);
    if !path.is_file() {
        println!("skipped: {SHAKESPEARE} is absent (the shared data folder is not checked out)");
        return;
    }
    let bytes = std::fs::metadata(path).expect("stat shakespeare.txt").len();

    let started = Instant::now();
    let tokens = load_tokens(path, None).expect("load shakespeare.txt");
    let parallel_s = started.elapsed().as_secs_f64();
    println!(
        "shakespeare.txt: {bytes} bytes -> {} tokens in {parallel_s:.2} s with load_tokens \
         ({:.0} tokens/s, {:.1} MB/s, {} cores)",
        tokens.len(),
        tokens.len() as f64 / parallel_s,
        bytes as f64 / parallel_s / 1e6,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    assert!(
        (1_200_000..=1_600_000).contains(&tokens.len()),
        "{} tokens is implausible for 5 MB of English under GPT-2 BPE",
        tokens.len()
    );
    check_vocab(&tokens, Tokenizer::VOCAB_SIZE).expect("GPT-2 ids fit GPT-2's vocabulary");

    let text = std::fs::read_to_string(path).expect("read shakespeare.txt");
    let started = Instant::now();
    let tokenizer = Tokenizer::gpt2().expect("GPT-2 tokenizer");
    println!("building the tokenizer: {:.2} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    let parallel = tokenizer.encode_parallel(&text);
    let parallel_only_s = started.elapsed().as_secs_f64();
    println!(
        "encode_parallel alone: {} tokens in {parallel_only_s:.2} s ({:.0} tokens/s)",
        parallel.len(),
        parallel.len() as f64 / parallel_only_s
    );
    let started = Instant::now();
    let single: Vec<u16> = tokenizer.encode(&text).into_iter().map(|id| id as u16).collect();
    let single_s = started.elapsed().as_secs_f64();
    println!(
        "single thread: {} tokens in {single_s:.2} s ({:.0} tokens/s)",
        single.len(),
        single.len() as f64 / single_s
    );
    assert_eq!(tokens, single, "parallel tokenization must equal whole-text tokenization");
}
