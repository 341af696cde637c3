//! Token plus position embedding: `out[B,T,C] = wte[tokens[b,t]] + wpe[t]`.
//!
//! Backward accumulates into `dwte` and `dwpe`. It is parallel over channel
//! ranges (each task visits every token in order), so the sums are in a fixed
//! order and the result is deterministic.

use crate::parallel::SendPtr;
use rayon::prelude::*;

pub fn embedding_forward(out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], b: usize, t: usize, c: usize) {
    assert_eq!(out.len(), b * t * c);
    assert_eq!(tokens.len(), b * t);
    assert!(wpe.len() >= t * c, "sequence of {t} longer than the position table");
    out.par_chunks_mut(c).enumerate().for_each(|(i, o)| {
        let tok = tokens[i] as usize;
        let pos = i % t;
        let e = &wte[tok * c..(tok + 1) * c];
        let p = &wpe[pos * c..(pos + 1) * c];
        for j in 0..c {
            o[j] = e[j] + p[j];
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub fn embedding_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    tokens: &[u32],
    b: usize,
    t: usize,
    c: usize,
) {
    assert_eq!(dout.len(), b * t * c);
    assert_eq!(tokens.len(), b * t);
    let width = 64.min(c);
    let (wte_ptr, wpe_ptr) = (SendPtr(dwte.as_mut_ptr()), SendPtr(dwpe.as_mut_ptr()));
    let (wte_len, wpe_len) = (dwte.len(), dwpe.len());
    (0..c.div_ceil(width)).into_par_iter().for_each(|chunk| {
        let (j0, j1) = (chunk * width, ((chunk + 1) * width).min(c));
        for i in 0..b * t {
            let tok = tokens[i] as usize;
            let pos = i % t;
            assert!((tok + 1) * c <= wte_len && (pos + 1) * c <= wpe_len);
            let g = &dout[i * c + j0..i * c + j1];
            // SAFETY: this task alone touches channels j0..j1 of every row.
            unsafe {
                let e = std::slice::from_raw_parts_mut(wte_ptr.get().add(tok * c + j0), j1 - j0);
                let p = std::slice::from_raw_parts_mut(wpe_ptr.get().add(pos * c + j0), j1 - j0);
                for j in 0..j1 - j0 {
                    e[j] += g[j];
                    p[j] += g[j];
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::{assert_close, random};
    use crate::Rng;

    #[test]
    fn embedding_backward_is_the_transpose_of_forward() {
        // For linear maps, <forward(dw), g> == <dw, backward(g)>; with a
        // repeated token the accumulation path is exercised too.
        let mut rng = Rng::new(41);
        let (b, t, c, v) = (2, 5, 70, 11);
        let tokens = vec![3, 3, 0, 10, 7, 3, 1, 1, 2, 9];
        let wte = random(&mut rng, v * c);
        let wpe = random(&mut rng, t * c);
        let g = random(&mut rng, b * t * c);
        let mut out = vec![0f32; b * t * c];
        embedding_forward(&mut out, &tokens, &wte, &wpe, b, t, c);
        let mut expect = vec![0f32; b * t * c];
        for i in 0..b * t {
            for j in 0..c {
                expect[i * c + j] = wte[tokens[i] as usize * c + j] + wpe[(i % t) * c + j];
            }
        }
        assert_close("forward", &out, &expect, 0.0, 0.0);
        let (mut dwte, mut dwpe) = (vec![0f32; v * c], vec![0f32; t * c]);
        embedding_backward(&mut dwte, &mut dwpe, &g, &tokens, b, t, c);
        let lhs: f64 = out.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum();
        let rhs: f64 = wte.iter().zip(&dwte).chain(wpe.iter().zip(&dwpe)).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((lhs - rhs).abs() < 1e-3, "{lhs} vs {rhs}");
    }
}
