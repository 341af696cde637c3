//! Every tensor of a model in one device buffer (weights, gradients or an
//! AdamW moment), in tensor order, with per-layer address lists for
//! [`crate::GpuWorkspace`].

use crate::driver::{DevBuf, Gpu, Result, Stream};
use ws_model::{ModelSpec, Params};

pub struct DeviceParams {
    pub buf: DevBuf<f32>,
    /// Element offset of each tensor.
    pub offsets: Vec<usize>,
}

impl DeviceParams {
    /// Zeroed tensors shaped as `spec`.
    pub fn zeros(gpu: &Gpu, spec: &ModelSpec) -> Result<DeviceParams> {
        let mut offsets = Vec::with_capacity(spec.tensors.len());
        let mut n = 0;
        for t in &spec.tensors {
            offsets.push(n);
            n += t.numel();
        }
        Ok(DeviceParams { buf: gpu.zeros(n)?, offsets })
    }

    pub fn from_host(gpu: &Gpu, spec: &ModelSpec, params: &Params) -> Result<DeviceParams> {
        let d = DeviceParams::zeros(gpu, spec)?;
        for (i, t) in params.tensors.iter().enumerate() {
            gpu.upload(d.buf.at(d.offsets[i]), t, &gpu.compute)?;
        }
        gpu.compute.synchronize()?;
        Ok(d)
    }

    /// The tensors back on the host (waits for the compute stream).
    pub fn to_host(&self, gpu: &Gpu, spec: &ModelSpec) -> Result<Params> {
        let mut p = Params::zeros(spec);
        for (i, t) in p.tensors.iter_mut().enumerate() {
            gpu.download(t, self.buf.at(self.offsets[i]), &gpu.compute)?;
        }
        Ok(p)
    }

    pub fn tensor(&self, i: usize) -> u64 {
        self.buf.at(self.offsets[i])
    }

    /// Addresses of layer `l`'s tensors, in the layer's order.
    pub fn layer(&self, spec: &ModelSpec, l: usize) -> Vec<u64> {
        spec.layers[l].tensors.iter().map(|&t| self.tensor(t)).collect()
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn zero(&self, gpu: &Gpu, s: &Stream) -> Result<()> {
        gpu.memset_zero(self.buf.ptr(), self.buf.bytes(), s)
    }
}
