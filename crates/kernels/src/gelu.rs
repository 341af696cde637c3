//! GELU, tanh approximation (Hugging Face `gelu_new`, GPT-2's activation),
//! computed through the identical sigmoid form.
//!
//! Backward overwrites `dinp`.

use crate::math::sigmoid;
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const COEF: f32 = 0.044715;
const CHUNK: usize = 16384;

// 0.5 * (1 + tanh(u)) = sigmoid(2u), so gelu(x) = x * sigmoid(2u) with
// u = sqrt(2/pi) (x + 0.044715 x^3): one vectorizable exp, no cancellation.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + COEF * x * x * x);
    x * sigmoid(2.0 * u)
}

// d/dx x*s(2u) = s + x * 2 s (1 - s) * u'(x).
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + COEF * x * x * x);
    let s = sigmoid(2.0 * u);
    s + x * 2.0 * s * (1.0 - s) * SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * x * x)
}

pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len());
    out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = gelu(x);
        }
    });
}

/// `d = d * gelu'(inp)`: turns d(out) into d(inp) in place.
pub fn gelu_backward_inplace(d: &mut [f32], inp: &[f32]) {
    assert_eq!(d.len(), inp.len());
    d.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(d, x)| {
        for (d, &x) in d.iter_mut().zip(x) {
            *d *= gelu_grad(x);
        }
    });
}

pub mod reference {
    pub fn gelu(x: f64) -> f64 {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
    }
    pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
        for (o, &x) in out.iter_mut().zip(inp) {
            *o = gelu(x as f64) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::{assert_close, random};
    use crate::Rng;

    #[test]
    fn gelu_matches_reference_and_finite_differences() {
        let mut rng = Rng::new(4);
        let mut x = random(&mut rng, 40_000);
        for v in x.iter_mut() {
            *v *= 6.0;
        }
        let mut out = vec![0f32; x.len()];
        let mut out_r = vec![0f32; x.len()];
        gelu_forward(&mut out, &x);
        reference::gelu_forward(&mut out_r, &x);
        assert_close("gelu", &out, &out_r, 1e-5, 1e-6);

        let mut d = vec![1f32; x.len()];
        gelu_backward_inplace(&mut d, &x);
        for (i, &xi) in x.iter().enumerate().step_by(97) {
            let h = 1e-4;
            let fd = (reference::gelu(xi as f64 + h) - reference::gelu(xi as f64 - h)) / (2.0 * h);
            assert!((fd - d[i] as f64).abs() < 1e-4, "gelu'({xi}): {} vs {fd}", d[i]);
        }
    }
}
