//! A node's reduce of F children's 1 MiB f32 chunks, one thread: the median
//! of 200 calls per F.   cargo run --release -p ws-fabric --example reduce_micro
use bytes::Bytes;
use ws_fabric::{Dtype, Frame, Kind};
fn main() {
    for f in [2usize, 4, 8] {
        let frames: Vec<Frame> = (0..f)
            .map(|i| Frame {
                dtype: Dtype::F32,
                total: 1 << 20,
                payload: Bytes::from(vec![i as u8; 1 << 20]),
                ..Frame::control(Kind::Grads)
            })
            .collect();
        let mut ts = Vec::new();
        for _ in 0..200 {
            let t = std::time::Instant::now();
            let r = ws_fabric::node::reduce(&frames).unwrap();
            std::hint::black_box(&r);
            ts.push(t.elapsed().as_secs_f64());
        }
        ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let m = ts[100];
        println!(
            "F={f}: {:.1} us per 1 MiB chunk, {:.2} GB/s out, {:.2} GB/s in",
            m * 1e6,
            (1 << 20) as f64 / m / 1e9,
            (f << 20) as f64 / m / 1e9
        );
    }
}
