//! Store checkpoints: a snapshot of every slab (weights and moments) at a
//! step boundary, crash safe.
//!
//! Protocol: write each slab to a new file in a directory named for the
//! step (its pages in order, each page's weights, first and second moments),
//! fsync it; write the manifest (step, every slab's file, size and
//! CRC32, and the run's configuration) to a temporary file, fsync, rename it
//! over `manifest.json`, fsync the directory. Until that rename the previous
//! manifest, and the files it lists, stay valid; after it the older step's
//! files are removed. Loading verifies every slab against the manifest.

use crate::{io, Layout, Result, Store, StoreConfig, StoreError};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use ws_model::{Masks, ModelSpec};

pub const MANIFEST: &str = "manifest.json";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlabEntry {
    pub layer: usize,
    /// Relative to the checkpoint directory.
    pub file: String,
    pub bytes: u64,
    pub crc32: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Steps completed: the weights are version `step`.
    pub step: u64,
    /// Parameters per page of the slab files.
    pub page_params: usize,
    pub slabs: Vec<SlabEntry>,
    /// The resolved run configuration (TOML), so a resume needs nothing else.
    pub run_toml: String,
    /// The sparse tensors' patterns (`ws_model::sparsity`), when there are any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masks: Option<FileEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the checkpoint directory.
    pub file: String,
    pub bytes: u64,
    pub crc32: u32,
}

fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io("cannot fsync directory", dir))
}

fn bad(path: &Path, problem: impl Into<String>) -> StoreError {
    StoreError::Checkpoint { path: path.to_path_buf(), problem: problem.into() }
}

/// Reads and checks the manifest of the checkpoint directory `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(io("cannot read checkpoint manifest", &path))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| bad(&path, format!("invalid manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(bad(&path, format!("manifest format {} is not {FORMAT}", m.format)));
    }
    Ok(m)
}

// A page's bytes in memory are the checkpoint format's little-endian floats.
const _: () = assert!(cfg!(target_endian = "little"), "checkpoints are written as little-endian memory");

impl Store {
    /// Writes a checkpoint of the current version into `dir` (see the
    /// module header). Applies pending updates first.
    pub fn checkpoint(&mut self, dir: &Path, run_toml: &str) -> Result<Manifest> {
        self.flush()?;
        let step = self.version;
        let sub = format!("step-{step:08}");
        let step_dir = dir.join(&sub);
        let _ = std::fs::remove_dir_all(&step_dir);
        std::fs::create_dir_all(&step_dir).map_err(io("cannot create directory", &step_dir))?;
        let mut files: Vec<(std::fs::File, PathBuf, String, crc32fast::Hasher, u64)> = Vec::new();
        for s in 0..self.layout.slab_params.len() {
            let file = format!("{sub}/slab-{s:05}.bin");
            let path = dir.join(&file);
            let f = std::fs::File::create(&path).map_err(io("cannot create", &path))?;
            files.push((f, path, file, crc32fast::Hasher::new(), 0));
        }
        self.for_each_page(|s, _i, regions| {
            // Weights, first and second moments (the gradient holds nothing
            // at a step boundary), straight from the page: no staging copy.
            let (f, path, _, crc, n) = &mut files[s];
            for region in [0, 2, 3] {
                let bytes = &regions[region].as_bytes()[..4 * regions[region].len()];
                f.write_all(bytes).map_err(io("cannot write", path))?;
                crc.update(bytes);
                *n += bytes.len() as u64;
            }
            Ok(())
        })?;
        let mut slabs = Vec::new();
        for (s, (f, path, file, crc, n)) in files.into_iter().enumerate() {
            f.sync_all().map_err(io("cannot fsync", &path))?;
            slabs.push(SlabEntry { layer: s, file, bytes: n, crc32: crc.finalize() });
        }
        let masks = if self.masks.is_sparse() {
            let file = format!("{sub}/{}", ws_model::sparsity::MASKS_FILE);
            let path = dir.join(&file);
            let bytes = self.masks.to_safetensors(&self.spec);
            let mut f = std::fs::File::create(&path).map_err(io("cannot create", &path))?;
            f.write_all(&bytes).map_err(io("cannot write", &path))?;
            f.sync_all().map_err(io("cannot fsync", &path))?;
            Some(FileEntry { file, bytes: bytes.len() as u64, crc32: crc32fast::hash(&bytes) })
        } else {
            None
        };
        fsync_dir(&step_dir)?;
        let manifest = Manifest {
            format: FORMAT,
            step,
            page_params: self.config.page_params,
            slabs,
            run_toml: run_toml.to_string(),
            masks,
        };
        let tmp = dir.join(format!("{MANIFEST}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp).map_err(io("cannot create", &tmp))?;
            f.write_all(&serde_json::to_vec_pretty(&manifest).expect("json")).map_err(io("cannot write", &tmp))?;
            f.sync_all().map_err(io("cannot fsync", &tmp))?;
        }
        std::fs::rename(&tmp, dir.join(MANIFEST)).map_err(io("cannot rename manifest into place", dir))?;
        fsync_dir(dir)?;
        // The new manifest is durable: older snapshots can go.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("step-") && name != sub {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(manifest)
    }

    /// A store (in `store_dir`) holding the checkpoint in `dir`, every slab
    /// verified against the manifest. The store keeps the checkpoint's page
    /// size; it reads one page at a time.
    pub fn restore(spec: &ModelSpec, dir: &Path, store_dir: &Path, config: StoreConfig) -> Result<(Store, Manifest)> {
        let manifest = read_manifest(dir)?;
        let config = StoreConfig { page_params: manifest.page_params, ..config };
        let saved = Layout::new(spec, manifest.page_params);
        if manifest.slabs.len() != saved.slab_params.len() {
            return Err(bad(
                dir,
                format!("{} slabs for a model of {} layers", manifest.slabs.len(), saved.slab_params.len()),
            ));
        }
        for (s, e) in manifest.slabs.iter().enumerate() {
            let n = saved.slab_params[s] as u64;
            if e.layer != s || e.bytes != 12 * n {
                let path = dir.join(&e.file);
                return Err(bad(
                    &path,
                    format!("entry for layer {} of {} bytes; layer {s} needs {}", e.layer, e.bytes, 12 * n),
                ));
            }
        }
        let masks = load_masks(spec, dir, &manifest)?;
        let mut open: Option<(usize, std::fs::File, crc32fast::Hasher)> = None;
        let mut raw = Vec::new();
        let mut store = Store::create_with(spec, manifest.step, store_dir, config, |s, p0, p1, page| {
            let e = &manifest.slabs[s];
            let path: PathBuf = dir.join(&e.file);
            if open.as_ref().is_none_or(|o| o.0 != s) {
                let f = std::fs::File::open(&path).map_err(io("cannot open checkpoint slab", &path))?;
                open = Some((s, f, crc32fast::Hasher::new()));
            }
            let (_, f, crc) = open.as_mut().expect("opened above");
            let len = p1 - p0;
            raw.resize(12 * len, 0);
            f.read_exact(&mut raw).map_err(io("cannot read checkpoint slab", &path))?;
            crc.update(&raw);
            for (k, region) in [0, 2, 3].into_iter().enumerate() {
                for (j, x) in page[region * len..(region + 1) * len].iter_mut().enumerate() {
                    let at = 4 * (k * len + j);
                    *x = f32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
                }
            }
            if p1 == saved.slab_params[s] {
                let (_, _, crc) = open.take().expect("opened above");
                let found = crc.finalize();
                if found != e.crc32 {
                    return Err(StoreError::Corrupt { path, layer: s, found, expected: e.crc32 });
                }
            }
            Ok(())
        })?;
        store.masks = masks;
        Ok((store, manifest))
    }
}

/// The masks a checkpoint lists, verified against its CRC and the model.
fn load_masks(spec: &ModelSpec, dir: &Path, manifest: &Manifest) -> Result<Masks> {
    let Some(e) = &manifest.masks else {
        if spec.is_sparse() {
            return Err(bad(dir, "has no masks, but the model has sparse tensors (is this the run's configuration?)"));
        }
        return Ok(Masks::dense(spec));
    };
    let path = dir.join(&e.file);
    let bytes = std::fs::read(&path).map_err(io("cannot read checkpoint masks", &path))?;
    let found = crc32fast::hash(&bytes);
    if bytes.len() as u64 != e.bytes || found != e.crc32 {
        return Err(bad(
            &path,
            format!(
                "is corrupt: {} bytes with checksum {found:08x}, expected {} with {:08x}",
                bytes.len(),
                e.bytes,
                e.crc32
            ),
        ));
    }
    let masks = Masks::from_safetensors(spec, &bytes).map_err(|p| bad(&path, p))?;
    masks.check(spec).map_err(|p| bad(&path, p))?;
    Ok(masks)
}

/// The masks of the checkpoint in `dir`, verified (dense masks for a model without sparse tensors).
pub fn read_checkpoint_masks(spec: &ModelSpec, dir: &Path) -> Result<Masks> {
    load_masks(spec, dir, &read_manifest(dir)?)
}

/// Streams the weights of the checkpoint in `dir` without building a store:
/// `f(tensor, element offset within the tensor, values)` for every piece of
/// every tensor, slab by slab and page by page, one page in memory. Each
/// slab's CRC32 is checked when its last page has been read, so a caller
/// must treat what it received as unverified until this returns `Ok`.
pub fn read_checkpoint_weights(
    spec: &ModelSpec,
    dir: &Path,
    mut f: impl FnMut(usize, usize, &[f32]) -> Result<()>,
) -> Result<Manifest> {
    let manifest = read_manifest(dir)?;
    let layout = Layout::new(spec, manifest.page_params);
    if manifest.slabs.len() != layout.slab_params.len() {
        return Err(bad(
            dir,
            format!("{} slabs for a model of {} layers", manifest.slabs.len(), layout.slab_params.len()),
        ));
    }
    let mut raw = Vec::new();
    let mut w = Vec::new();
    for (s, e) in manifest.slabs.iter().enumerate() {
        let path = dir.join(&e.file);
        if e.layer != s || e.bytes != 12 * layout.slab_params[s] as u64 {
            return Err(bad(&path, format!("entry for layer {} of {} bytes does not fit layer {s}", e.layer, e.bytes)));
        }
        let mut file = std::fs::File::open(&path).map_err(io("cannot open checkpoint slab", &path))?;
        let mut crc = crc32fast::Hasher::new();
        for i in 0..layout.pages[s].len() - 1 {
            let (p0, p1) = (layout.pages[s][i], layout.pages[s][i + 1]);
            let len = p1 - p0;
            raw.resize(12 * len, 0);
            file.read_exact(&mut raw).map_err(io("cannot read checkpoint slab", &path))?;
            crc.update(&raw);
            w.clear();
            w.extend(raw[..4 * len].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            for (t, off, lo, hi) in layout.tensors_in(spec, s, p0, p1) {
                f(t, lo - off, &w[lo - p0..hi - p0])?;
            }
        }
        let found = crc.finalize();
        if found != e.crc32 {
            return Err(StoreError::Corrupt { path, layer: s, found, expected: e.crc32 });
        }
    }
    Ok(manifest)
}
