//! The model's shape, with the checks that make every later shape assertion hold.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpt2Config {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Maximum sequence length (HF `n_positions`).
    pub block_size: usize,
    pub vocab_size: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("model.{field} must be at least 1 (got 0)")]
    Zero { field: &'static str },
    #[error("model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head})")]
    HeadsDoNotDivide { n_embd: usize, n_head: usize },
    #[error("model.vocab_size ({vocab_size}) is above 65536, which uint16 token files cannot address")]
    VocabTooLarge { vocab_size: usize },
}

impl Gpt2Config {
    /// GPT-2 124M with the vocabulary padded to a multiple of 64 (50304).
    pub fn gpt2_small() -> Gpt2Config {
        Gpt2Config { n_layer: 12, n_head: 12, n_embd: 768, block_size: 1024, vocab_size: 50304 }
    }

    /// The `tiny` benchmark model: 4 layers, 4 heads, 256 channels, block 256.
    pub fn tiny() -> Gpt2Config {
        Gpt2Config { n_layer: 4, n_head: 4, n_embd: 256, block_size: 256, vocab_size: 50304 }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("block_size", self.block_size),
            ("vocab_size", self.vocab_size),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ConfigError::HeadsDoNotDivide { n_embd: self.n_embd, n_head: self.n_head });
        }
        if self.vocab_size > 65536 {
            return Err(ConfigError::VocabTooLarge { vocab_size: self.vocab_size });
        }
        Ok(())
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Forward plus backward FLOPs per token (6 per parameter multiply-add
    /// for the linear layers and the tied head, plus attention), the usual
    /// accounting for model FLOP utilisation. `t` is the sequence length.
    pub fn train_flops_per_token(&self, t: usize) -> f64 {
        let c = self.n_embd as f64;
        let per_block_linear = 12.0 * c * c; // qkv 3C^2 + proj C^2 + mlp 8C^2
        let linear = self.n_layer as f64 * per_block_linear + self.vocab_size as f64 * c;
        // QK^T and PV: 2 * 2 * T * C per token per layer forward; causal halves it.
        let attention = self.n_layer as f64 * 2.0 * t as f64 * c;
        6.0 * linear + 3.0 * attention
    }
}
