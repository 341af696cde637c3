//! CPU kernels for weightstream.
//!
//! Every kernel here works on plain contiguous `f32` slices with its
//! dimensions passed explicitly (llm.c style), so that the same kernels serve
//! a resident model, a streamed layer or a GPU check. Each fast kernel has a
//! plain reference version beside it (`reference` submodules) and the tests
//! compare the two on random inputs.
//!
//! Conventions, the same in every module:
//! - argument order: outputs, saved-for-backward, inputs, weights, dimensions;
//! - shapes use one alphabet: B batch, T time, C channels, H heads, V vocab,
//!   N output channels of a linear layer, K its input channels;
//! - parameter gradients accumulate (`+=`); activation gradients overwrite,
//!   unless the function says it accumulates (the residual stream).
//!
//! What is not here: the model (which kernel runs when), the optimizer
//! schedule, I/O.

pub mod adamw;
pub mod attention;
pub mod bf16;
pub mod crossentropy;
pub mod embedding;
pub mod gelu;
pub mod layernorm;
pub mod math;
pub mod matmul;
pub mod parallel;
pub mod rng;
pub mod sparse;

pub use rng::Rng;

/// The precision of the products in a linear layer: fp32 throughout, or bf16
/// inputs with fp32 accumulation and output ([`bf16`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Precision> {
        match s {
            "fp32" => Some(Precision::Fp32),
            "bf16" => Some(Precision::Bf16),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}
