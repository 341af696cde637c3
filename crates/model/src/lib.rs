//! GPT-2, exactly as Hugging Face `GPT2LMHeadModel` defines it, as an ordered
//! list of streamable layers: the embedding, `n_layer` transformer blocks, and
//! the head (final LayerNorm plus the output projection tied to the token
//! embedding).
//!
//! Nothing here owns weights. Each layer declares its parameter tensors (HF
//! names and shapes, see [`spec`]); its `forward` and `backward` are handed
//! the weights when they run. A training step is the loop
//! `forward(0..L)`, `head`, `backward(L-1..0)`, whoever provides the weights:
//! a resident parameter set, or the weight-streaming executor.
//!
//! Activations live in a [`Workspace`] allocated once for a maximum batch and
//! sequence length; nothing is allocated in the step loop except scratch
//! vectors inside kernels' parallel reductions.

pub mod config;
pub mod params;
pub mod sparsity;
pub mod spec;
pub mod workspace;

pub use config::{ConfigError, Gpt2Config};
pub use params::Params;
pub use sparsity::Masks;
pub use spec::{LayerKind, LayerSpec, ModelSpec, TensorSpec};
pub use workspace::Workspace;
