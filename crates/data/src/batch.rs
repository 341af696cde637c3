//! Train/validation split and the windows a model sees.
//!
//! What it does: cuts a token stream into a training part and the validation
//! tail; draws training batches of B random windows of T+1 tokens; enumerates
//! the non-overlapping windows used for evaluation.
//!
//! What it does not: shuffle or shard files, pad, or own any buffers beyond
//! the two `Vec`s the caller passes in (allocate them once at start-up, with
//! capacity B*T, and the step loop does not allocate).
//!
//! Invariants:
//! - a window at offset `o` gives inputs `tokens[o..o+T]` and targets
//!   `tokens[o+1..o+T+1]`: targets are inputs shifted by one;
//! - `sample_batch` is a pure function of its arguments: the offsets come from
//!   `Rng::for_stream(seed, stream, index)`, so a resumed run that passes the
//!   same step index sees the same batch on every machine;
//! - after `split` succeeds, both parts hold at least T+1 tokens, so
//!   `sample_batch` and at least one `window` are valid on each.

use crate::DataError;
use ws_kernels::Rng;

/// A corpus cut in two: `val` is the last `val_fraction` of the tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<u16>,
    pub val: Vec<u16>,
}

/// Splits `tokens` so the validation part is the last
/// `floor(len * val_fraction)` tokens; both parts must hold `seq + 1` tokens
/// (one window of `seq` inputs and its shifted targets).
pub fn split(mut tokens: Vec<u16>, val_fraction: f64, seq: usize) -> Result<Split, DataError> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(DataError::ValFraction { val_fraction });
    }
    let window = seq + 1;
    let (_, val_len) = split_lengths(tokens.len(), val_fraction);
    if !split_fits(tokens.len(), val_fraction, window) {
        return Err(DataError::TooFewTokens {
            tokens: tokens.len(),
            tokens_needed: tokens_needed(val_fraction, window),
            window,
        });
    }
    let val = tokens.split_off(tokens.len() - val_len);
    tokens.shrink_to_fit();
    Ok(Split { train: tokens, val })
}

/// `(train, val)` lengths of a split of `len` tokens.
fn split_lengths(len: usize, val_fraction: f64) -> (usize, usize) {
    let val_len = ((len as f64 * val_fraction).floor() as usize).min(len);
    (len - val_len, val_len)
}

fn split_fits(len: usize, val_fraction: f64, window: usize) -> bool {
    let (train_len, val_len) = split_lengths(len, val_fraction);
    train_len >= window && val_len >= window
}

/// Smallest token count whose split fits `window` in both parts. Both part
/// lengths grow monotonically with the total, so a binary search finds it; the
/// answer saturates at `usize::MAX` for absurdly small fractions.
fn tokens_needed(val_fraction: f64, window: usize) -> usize {
    let mut low = 0usize; // does not fit (window >= 1)
    let mut high = usize::MAX;
    if !split_fits(high, val_fraction, window) {
        return usize::MAX;
    }
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if split_fits(middle, val_fraction, window) {
            high = middle;
        } else {
            low = middle;
        }
    }
    high
}

/// Fills `inputs` and `targets` (cleared first) with `b` windows of `t`
/// tokens, B-major (`[B, T]`), at offsets drawn uniformly from
/// `[0, len - t - 1]` by `Rng::for_stream(seed, stream, index)`.
///
/// Panics unless `t > 0` and `tokens.len() >= t + 1`: `split` guarantees that
/// for both parts, so a violation is a bug in the caller.
// The trainer and CLI call this signature (outputs last, unlike the kernels'
// outputs-first order); eight plain values read better than a struct here.
#[allow(clippy::too_many_arguments)]
pub fn sample_batch(
    tokens: &[u16],
    b: usize,
    t: usize,
    seed: u64,
    stream: u64,
    index: u64,
    inputs: &mut Vec<u32>,
    targets: &mut Vec<u32>,
) {
    assert!(t > 0, "sample_batch: T must be positive");
    assert!(tokens.len() > t, "sample_batch: {} tokens cannot hold a window of T+1 = {}", tokens.len(), t + 1);
    inputs.clear();
    targets.clear();
    let offsets = (tokens.len() - t) as u64; // offsets 0 ..= len - t - 1
    let mut rng = Rng::for_stream(seed, stream, index);
    for _ in 0..b {
        let offset = rng.below(offsets) as usize;
        push_window(tokens, offset, t, inputs, targets);
    }
    assert_eq!(inputs.len(), b * t);
    assert_eq!(targets.len(), b * t);
}

/// Number of non-overlapping evaluation windows of `t` inputs in `len`
/// tokens: window `i` reads `tokens[i*t .. i*t + t + 1]`, and a tail too short
/// for a whole window is dropped. That is `(len - 1) / t`.
pub fn eval_windows(len: usize, t: usize) -> usize {
    assert!(t > 0, "eval_windows: T must be positive");
    len.saturating_sub(1) / t
}

/// Appends (does not clear) evaluation window `i`: inputs
/// `tokens[i*t .. i*t+t]`, targets `tokens[i*t+1 .. i*t+t+1]`.
/// Panics unless `i < eval_windows(tokens.len(), t)`.
pub fn window(tokens: &[u16], t: usize, i: usize, inputs: &mut Vec<u32>, targets: &mut Vec<u32>) {
    let windows = eval_windows(tokens.len(), t);
    assert!(i < windows, "window {i} of {windows} (len {}, T {t})", tokens.len());
    push_window(tokens, i * t, t, inputs, targets);
}

fn push_window(tokens: &[u16], offset: usize, t: usize, inputs: &mut Vec<u32>, targets: &mut Vec<u32>) {
    let span = &tokens[offset..offset + t + 1];
    inputs.extend(span[..t].iter().map(|&id| id as u32));
    targets.extend(span[1..].iter().map(|&id| id as u32));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(len: usize) -> Vec<u16> {
        (0..len).map(|i| (i % 60_000) as u16).collect()
    }

    #[test]
    fn split_puts_the_last_fraction_in_validation() {
        let split = split(ramp(1000), 0.1, 16).unwrap();
        assert_eq!(split.train.len(), 900);
        assert_eq!(split.val.len(), 100);
        assert_eq!(split.train[899], 899);
        assert_eq!(split.val[0], 900);
    }

    #[test]
    fn split_needs_a_window_in_each_part() {
        // 10% of 160 is 16 < 17 = seq+1; the smallest that fits is 170.
        let error = split(ramp(160), 0.1, 16).unwrap_err();
        assert!(matches!(error, DataError::TooFewTokens { tokens: 160, tokens_needed: 170, window: 17 }), "{error}");
        assert!(split(ramp(170), 0.1, 16).is_ok());
        assert!(split(ramp(169), 0.1, 16).is_err());
        let message = error.to_string();
        assert!(message.starts_with("data has 160 tokens; training needs at least 170"), "{message}");

        // A large fraction limits the training part instead.
        // ceil(0.1 * len) >= 17 first holds at 161.
        let error = split(ramp(20), 0.9, 16).unwrap_err();
        assert!(matches!(error, DataError::TooFewTokens { tokens_needed: 161, .. }), "{error}");
        assert!(split(ramp(161), 0.9, 16).is_ok());
        assert!(split(ramp(160), 0.9, 16).is_err());
    }

    #[test]
    fn split_rejects_a_fraction_outside_zero_to_one() {
        for val_fraction in [0.0, 1.0, -0.5, 1.5, f64::NAN] {
            let error = split(ramp(1000), val_fraction, 4).unwrap_err();
            assert!(matches!(error, DataError::ValFraction { .. }), "{error}");
        }
    }

    #[test]
    fn tokens_needed_is_the_smallest_count_that_fits() {
        for val_fraction in [0.001, 0.05, 0.1, 0.3, 0.5, 0.7, 0.999] {
            for window in [1, 2, 17, 1025] {
                let needed = tokens_needed(val_fraction, window);
                assert!(split_fits(needed, val_fraction, window));
                assert!(!split_fits(needed - 1, val_fraction, window));
            }
        }
        assert_eq!(tokens_needed(1e-300, 2), usize::MAX);
    }

    #[test]
    fn sample_batch_is_deterministic_and_targets_are_inputs_shifted_by_one() {
        let tokens = ramp(10_000);
        let (b, t) = (4, 32);
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        sample_batch(&tokens, b, t, 1337, 0, 17, &mut inputs, &mut targets);
        assert_eq!(inputs.len(), b * t);
        assert_eq!(targets.len(), b * t);
        for row in 0..b {
            let row_inputs = &inputs[row * t..(row + 1) * t];
            let row_targets = &targets[row * t..(row + 1) * t];
            assert_eq!(&row_inputs[1..], &row_targets[..t - 1]);
            let offset = row_inputs[0] as usize;
            let expected: Vec<u32> = tokens[offset + 1..offset + t + 1].iter().map(|&x| x as u32).collect();
            assert_eq!(row_targets, expected.as_slice());
        }

        let (mut again_inputs, mut again_targets) = (vec![7; 3], vec![7; 3]);
        sample_batch(&tokens, b, t, 1337, 0, 17, &mut again_inputs, &mut again_targets);
        assert_eq!(again_inputs, inputs, "same arguments, same batch (vectors are cleared)");
        assert_eq!(again_targets, targets);

        for (seed, stream, index) in [(1338, 0, 17), (1337, 1, 17), (1337, 0, 18)] {
            sample_batch(&tokens, b, t, seed, stream, index, &mut again_inputs, &mut again_targets);
            assert_ne!(again_inputs, inputs, "seed {seed} stream {stream} index {index}");
        }
    }

    #[test]
    fn sample_batch_offsets_cover_the_whole_valid_range() {
        // len = t + 3 leaves offsets 0, 1, 2; all must occur, nothing past.
        let tokens = ramp(8);
        let t = 5;
        let mut seen = [false; 3];
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for index in 0..200 {
            sample_batch(&tokens, 1, t, 7, 0, index, &mut inputs, &mut targets);
            seen[inputs[0] as usize] = true;
            assert_eq!(*targets.last().unwrap() as usize, inputs[0] as usize + t);
        }
        assert_eq!(seen, [true; 3]);

        // The smallest valid slice: exactly T+1 tokens, one possible window.
        sample_batch(&tokens[..t + 1], 2, t, 7, 0, 0, &mut inputs, &mut targets);
        assert_eq!(inputs, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
    }

    #[test]
    #[should_panic(expected = "cannot hold a window")]
    fn sample_batch_panics_on_a_slice_shorter_than_a_window() {
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        sample_batch(&ramp(5), 1, 5, 0, 0, 0, &mut inputs, &mut targets);
    }

    #[test]
    fn eval_windows_drop_the_short_tail() {
        assert_eq!(eval_windows(0, 4), 0);
        assert_eq!(eval_windows(4, 4), 0);
        assert_eq!(eval_windows(5, 4), 1);
        assert_eq!(eval_windows(8, 4), 1);
        assert_eq!(eval_windows(9, 4), 2);
        assert_eq!(eval_windows(1001, 1), 1000);
    }

    #[test]
    fn windows_tile_the_tokens_and_append() {
        let tokens = ramp(11);
        let t = 4;
        let (mut inputs, mut targets) = (vec![99], vec![99]);
        for i in 0..eval_windows(tokens.len(), t) {
            window(&tokens, t, i, &mut inputs, &mut targets);
        }
        assert_eq!(inputs, [99, 0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(targets, [99, 1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    #[should_panic(expected = "window 2 of 2")]
    fn window_past_the_last_panics() {
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        window(&ramp(11), 4, 2, &mut inputs, &mut targets);
    }
}
