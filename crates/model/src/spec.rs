//! Which tensors the model has and which layer uses which.
//!
//! Tensor names and shapes are Hugging Face's (`transformer.h.0.attn.c_attn.weight`,
//! Conv1D weights stored [in, out]), so a checkpoint is written without
//! renaming or transposing. The token embedding is tied: the embedding layer
//! and the head both list it, and in a training step both contribute to its
//! gradient.

use crate::Gpt2Config;

#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// AdamW weight decay applies (2-D weights only).
    pub decay: bool,
    /// Standard deviation of the normal initialisation; `None` for LayerNorm
    /// weights (ones) and biases (zeros).
    pub init_std: Option<f32>,
    /// Nonzeros kept when the tensor is sparse (see [`crate::sparsity`]):
    /// only they are stored, streamed, summed and updated.
    pub nnz: Option<usize>,
}

impl TensorSpec {
    /// Elements of the dense tensor (its shape).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Values stored, streamed and updated: the nonzeros of a sparse tensor,
    /// every element of a dense one.
    pub fn len(&self) -> usize {
        self.nnz.unwrap_or_else(|| self.numel())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_sparse(&self) -> bool {
        self.nnz.is_some()
    }

    /// The weight matrix of a linear layer (attention or MLP): the tensors
    /// that may be sparse.
    pub fn is_linear_weight(&self) -> bool {
        self.shape.len() == 2
            && [".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"]
                .iter()
                .any(|s| self.name.ends_with(s))
    }
    pub fn is_layernorm_weight(&self) -> bool {
        self.name.ends_with("ln_1.weight") || self.name.ends_with("ln_2.weight") || self.name.ends_with("ln_f.weight")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Embedding,
    Block(usize),
    Head,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSpec {
    pub kind: LayerKind,
    /// Indices into [`ModelSpec::tensors`], in the order the layer's
    /// `forward`/`backward` take them.
    pub tensors: Vec<usize>,
}

/// Index of each tensor within a block's list.
pub mod block {
    pub const LN1_W: usize = 0;
    pub const LN1_B: usize = 1;
    pub const ATTN_W: usize = 2;
    pub const ATTN_B: usize = 3;
    pub const PROJ_W: usize = 4;
    pub const PROJ_B: usize = 5;
    pub const LN2_W: usize = 6;
    pub const LN2_B: usize = 7;
    pub const FC_W: usize = 8;
    pub const FC_B: usize = 9;
    pub const FCPROJ_W: usize = 10;
    pub const FCPROJ_B: usize = 11;
    pub const COUNT: usize = 12;
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub config: Gpt2Config,
    pub tensors: Vec<TensorSpec>,
    /// Embedding, blocks 0..n_layer, head.
    pub layers: Vec<LayerSpec>,
}

impl ModelSpec {
    pub fn new(config: Gpt2Config) -> ModelSpec {
        let Gpt2Config { n_layer, n_embd: c, block_size, vocab_size: v, .. } = config;
        let std = 0.02f32;
        let proj_std = 0.02 / (2.0 * n_layer as f32).sqrt();
        let mut tensors = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, init_std: Option<f32>| {
            let decay = shape.len() == 2;
            tensors.push(TensorSpec { name, shape, decay, init_std, nnz: None });
            tensors.len() - 1
        };
        let wte = add("transformer.wte.weight".into(), vec![v, c], Some(std));
        let wpe = add("transformer.wpe.weight".into(), vec![block_size, c], Some(std));
        let mut layers = vec![LayerSpec { kind: LayerKind::Embedding, tensors: vec![wte, wpe] }];
        for i in 0..n_layer {
            let p = format!("transformer.h.{i}");
            let ids = vec![
                add(format!("{p}.ln_1.weight"), vec![c], None),
                add(format!("{p}.ln_1.bias"), vec![c], None),
                add(format!("{p}.attn.c_attn.weight"), vec![c, 3 * c], Some(std)),
                add(format!("{p}.attn.c_attn.bias"), vec![3 * c], None),
                add(format!("{p}.attn.c_proj.weight"), vec![c, c], Some(proj_std)),
                add(format!("{p}.attn.c_proj.bias"), vec![c], None),
                add(format!("{p}.ln_2.weight"), vec![c], None),
                add(format!("{p}.ln_2.bias"), vec![c], None),
                add(format!("{p}.mlp.c_fc.weight"), vec![c, 4 * c], Some(std)),
                add(format!("{p}.mlp.c_fc.bias"), vec![4 * c], None),
                add(format!("{p}.mlp.c_proj.weight"), vec![4 * c, c], Some(proj_std)),
                add(format!("{p}.mlp.c_proj.bias"), vec![c], None),
            ];
            debug_assert_eq!(ids.len(), block::COUNT);
            layers.push(LayerSpec { kind: LayerKind::Block(i), tensors: ids });
        }
        let lnf_w = add("transformer.ln_f.weight".into(), vec![c], None);
        let lnf_b = add("transformer.ln_f.bias".into(), vec![c], None);
        layers.push(LayerSpec { kind: LayerKind::Head, tensors: vec![lnf_w, lnf_b, wte] });
        ModelSpec { config, tensors, layers }
    }

    /// Unique parameters (the tied embedding counted once), dense.
    pub fn parameter_count(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    /// Values stored and updated: [`Self::parameter_count`] less the zeros of sparse tensors.
    pub fn stored_count(&self) -> usize {
        self.tensors.iter().map(TensorSpec::len).sum()
    }

    /// Makes tensor `t` sparse at `level` (the fraction of zeros, 0 to 0.99):
    /// it keeps round((1 - level) * numel) nonzeros. Level 0 makes it dense
    /// again. Only the linear layers' weight matrices may be sparse.
    pub fn set_sparsity(&mut self, t: usize, level: f64) -> Result<(), String> {
        let ts = &mut self.tensors[t];
        if !(0.0..=0.99).contains(&level) {
            return Err(format!("sparsity {level} of {} is outside 0 to 0.99", ts.name));
        }
        if level == 0.0 {
            ts.nnz = None;
            return Ok(());
        }
        if !ts.is_linear_weight() {
            return Err(format!(
                "{} cannot be sparse: only the attention and MLP weight matrices can (embeddings, LayerNorms and biases stay dense)",
                ts.name
            ));
        }
        ts.nnz = Some(((1.0 - level) * ts.numel() as f64).round() as usize);
        Ok(())
    }

    /// Whether any tensor is sparse.
    pub fn is_sparse(&self) -> bool {
        self.tensors.iter().any(TensorSpec::is_sparse)
    }

    pub fn tensor_index(&self, name: &str) -> Option<usize> {
        self.tensors.iter().position(|t| t.name == name)
    }

    /// Number of streamable layers, L = n_layer + 2.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Values layer `l` streams: its tensors' stored values in layer order.
    pub fn layer_len(&self, l: usize) -> usize {
        self.layers[l].tensors.iter().map(|&t| self.tensors[t].len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_small_has_124m_parameters_with_hf_names() {
        let mut config = Gpt2Config::gpt2_small();
        config.vocab_size = 50257;
        let spec = ModelSpec::new(config);
        assert_eq!(spec.parameter_count(), 124_439_808);
        assert_eq!(spec.layer_count(), 14);
        assert_eq!(spec.tensors[0].name, "transformer.wte.weight");
        assert_eq!(spec.tensors[4].shape, vec![768, 2304]);
        let head = spec.layers.last().unwrap();
        assert_eq!(head.kind, LayerKind::Head);
        assert_eq!(head.tensors[2], 0, "the head uses the tied token embedding");
        assert!(spec.tensors[0].decay && !spec.tensors[2].decay);
    }
}
