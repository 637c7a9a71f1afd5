//! GPU adapter (feature `cuda`): the KV cache in device memory and sparse attention over the
//! positions the CPU selected.
//!
//! * [`GpuKvCache`]: per layer, keys and values as f16 in one device buffer each, laid out
//!   `[position, kv_head, head_dim]` (position-major), so that appending a decoded token is
//!   one small host-to-device copy of `kv_heads * head_dim` halves per tensor; nothing is
//!   re-uploaded. Capacity is fixed at creation (as a serving stack's KV pool is).
//! * [`GpuSparseAttention::attend`]: uploads the selected positions of every kv_head
//!   (concatenated, with offsets) and launches one kernel for all query heads of the layer
//!   (`src/gpu/sparse_attention.cu`, compiled at run time with NVRTC): per query head, a
//!   numerically stable online softmax of `scale * q . k` over its kv_head's positions and
//!   the weighted sum of values, f32 accumulation.
//! * [`GpuSparseAttention::pipeline`]: per kv_head, the CPU selects while the GPU attends for
//!   the previous kv_head (one stream, asynchronous copies and launches), and reports how
//!   much selection time was hidden behind the GPU.
//!
//! CUDA is loaded dynamically: the crate builds without it, and before any CUDA call the
//! adapter checks that the driver and NVRTC libraries exist ([`Error::NoDevice`] otherwise,
//! never a panic).
//!
//! `unsafe` here (allowed for this module, against the house rule of the root crate): the
//! library probes and the kernel launch are `unsafe fn`s in cudarc. Each call states why it is
//! sound.
#![allow(unsafe_code)]

use crate::attention::AttentionRetriever;
use crate::error::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use half::f16;
use std::sync::Arc;
use std::time::Instant;

/// The kernel source.
pub const KERNEL_SOURCE: &str = include_str!("sparse_attention.cu");
/// Warps per block (must match `WARPS` in the kernel).
const WARPS: u32 = 4;
/// Largest head dimension the kernel handles (`MAX_DPL * 32`).
pub const MAX_HEAD_DIM: usize = 512;

fn gpu_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Gpu(format!("{what}: {e:?}"))
}

/// Whether the CUDA driver and NVRTC libraries can be loaded; `Err(NoDevice)` says which is
/// missing.
pub fn probe() -> Result<()> {
    // SAFETY: both probes only try to dlopen the library by its candidate names and drop the
    // handle; no CUDA function is called.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    if !driver {
        return Err(Error::NoDevice(
            "the CUDA driver library (libcuda) is not installed".into(),
        ));
    }
    // SAFETY: as above.
    let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    if !nvrtc {
        return Err(Error::NoDevice(
            "the NVRTC library (libnvrtc) is not installed".into(),
        ));
    }
    Ok(())
}

/// A CUDA device context and the stream the adapter works on.
#[derive(Clone)]
pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl GpuDevice {
    /// Opens device `ordinal` (after [`probe`]).
    pub fn new(ordinal: usize) -> Result<GpuDevice> {
        probe()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| match e.0 {
            cudarc::driver::sys::cudaError_enum::CUDA_ERROR_NO_DEVICE
            | cudarc::driver::sys::cudaError_enum::CUDA_ERROR_INVALID_DEVICE => {
                Error::NoDevice(format!("no CUDA device {ordinal}: {e:?}"))
            }
            _ => gpu_err("cuda init", e),
        })?;
        let stream = ctx.default_stream();
        Ok(GpuDevice { ctx, stream })
    }
}

/// Keys and values of every layer in device memory.
pub struct GpuKvCache {
    dev: GpuDevice,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    /// Per layer: `[capacity, kv_heads, head_dim]` f16 bits.
    keys: Vec<CudaSlice<u16>>,
    values: Vec<CudaSlice<u16>>,
    len: Vec<usize>,
}

impl GpuKvCache {
    /// Room for `capacity` positions of `layers` x `kv_heads` x `head_dim`.
    pub fn new(
        dev: &GpuDevice,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<GpuKvCache> {
        if layers == 0 || kv_heads == 0 || head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Err(Error::InvalidArgument(format!(
                "GPU cache needs layers, kv_heads > 0 and 0 < head_dim <= {MAX_HEAD_DIM}"
            )));
        }
        let per = capacity
            .checked_mul(kv_heads * head_dim)
            .ok_or_else(|| Error::InvalidArgument("capacity overflows".into()))?;
        let mut keys = Vec::with_capacity(layers);
        let mut values = Vec::with_capacity(layers);
        for _ in 0..layers {
            keys.push(
                dev.stream
                    .alloc_zeros::<u16>(per)
                    .map_err(|e| gpu_err("alloc", e))?,
            );
            values.push(
                dev.stream
                    .alloc_zeros::<u16>(per)
                    .map_err(|e| gpu_err("alloc", e))?,
            );
        }
        Ok(GpuKvCache {
            dev: dev.clone(),
            layers,
            kv_heads,
            head_dim,
            capacity,
            keys,
            values,
            len: vec![0; layers],
        })
    }

    /// Positions stored for `layer`.
    pub fn len(&self, layer: usize) -> usize {
        self.len.get(layer).copied().unwrap_or(0)
    }

    /// Whether `layer` holds nothing.
    pub fn is_empty(&self, layer: usize) -> bool {
        self.len(layer) == 0
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.layers {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} out of range ({} layers)",
                self.layers
            )));
        }
        Ok(())
    }

    /// Uploads a prompt: `keys` / `values` are `[kv_head, token, dim]` f16 (the CPU
    /// retriever's layout); they are transposed to position-major on the host once.
    pub fn prefill(&mut self, layer: usize, keys: &[f16], values: &[f16]) -> Result<()> {
        self.check_layer(layer)?;
        let (h, d) = (self.kv_heads, self.head_dim);
        if keys.len() != values.len() {
            return Err(Error::DimensionMismatch {
                expected: keys.len(),
                got: values.len(),
            });
        }
        if !keys.len().is_multiple_of(h * d) {
            return Err(Error::rows("keys", keys.len(), h * d));
        }
        let t = keys.len() / (h * d);
        if t > self.capacity {
            return Err(Error::InvalidArgument(format!(
                "{t} positions exceed the GPU cache capacity {}",
                self.capacity
            )));
        }
        let transpose = |x: &[f16]| -> Vec<u16> {
            let mut out = vec![0u16; t * h * d];
            for kv in 0..h {
                for p in 0..t {
                    for c in 0..d {
                        out[(p * h + kv) * d + c] = x[(kv * t + p) * d + c].to_bits();
                    }
                }
            }
            out
        };
        let (k, v) = (transpose(keys), transpose(values));
        let s = &self.dev.stream;
        s.memcpy_htod(&k, &mut self.keys[layer].slice_mut(0..k.len()))
            .map_err(|e| gpu_err("upload keys", e))?;
        s.memcpy_htod(&v, &mut self.values[layer].slice_mut(0..v.len()))
            .map_err(|e| gpu_err("upload values", e))?;
        self.len[layer] = t;
        Ok(())
    }

    /// Appends one decoded token: `key` / `value` are `[kv_head, dim]` f16. One copy of
    /// `kv_heads * head_dim` halves per tensor.
    pub fn append(&mut self, layer: usize, key: &[f16], value: &[f16]) -> Result<()> {
        self.check_layer(layer)?;
        let w = self.kv_heads * self.head_dim;
        if key.len() != w || value.len() != w {
            return Err(Error::DimensionMismatch {
                expected: w,
                got: key.len(),
            });
        }
        let p = self.len[layer];
        if p >= self.capacity {
            return Err(Error::InvalidArgument(format!(
                "the GPU cache is full ({} positions)",
                self.capacity
            )));
        }
        let s = &self.dev.stream;
        let k: &[u16] = bytemuck::cast_slice(key);
        let v: &[u16] = bytemuck::cast_slice(value);
        s.memcpy_htod(k, &mut self.keys[layer].slice_mut(p * w..(p + 1) * w))
            .map_err(|e| gpu_err("append key", e))?;
        s.memcpy_htod(v, &mut self.values[layer].slice_mut(p * w..(p + 1) * w))
            .map_err(|e| gpu_err("append value", e))?;
        self.len[layer] = p + 1;
        Ok(())
    }
}

/// The sparse-attention kernel, compiled for a device.
pub struct GpuSparseAttention {
    dev: GpuDevice,
    func: CudaFunction,
}

/// Timings of [`GpuSparseAttention::pipeline`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PipelineReport {
    /// Wall time of the whole step, seconds.
    pub total_s: f64,
    /// CPU selection time summed over kv heads, seconds.
    pub select_s: f64,
    /// GPU time of the launches (events), seconds.
    pub gpu_s: f64,
}

impl PipelineReport {
    /// Fraction of the selection time that ran while the GPU was busy:
    /// `(select + gpu - total) / select`, clamped to `[0, 1]`.
    pub fn hidden_fraction(&self) -> f64 {
        if self.select_s <= 0.0 {
            return 0.0;
        }
        ((self.select_s + self.gpu_s - self.total_s) / self.select_s).clamp(0.0, 1.0)
    }
}

impl GpuSparseAttention {
    /// Compiles the kernel (NVRTC) and loads it on `dev`.
    pub fn new(dev: &GpuDevice) -> Result<GpuSparseAttention> {
        let ptx = cudarc::nvrtc::compile_ptx(KERNEL_SOURCE).map_err(|e| gpu_err("nvrtc", e))?;
        let module = dev
            .ctx
            .load_module(ptx)
            .map_err(|e| gpu_err("load module", e))?;
        let func = module
            .load_function("sparse_attention")
            .map_err(|e| gpu_err("load function", e))?;
        Ok(GpuSparseAttention {
            dev: dev.clone(),
            func,
        })
    }

    /// Attention of `queries` (`[kv_heads * group, head_dim]` f32) over `positions[kv]` of
    /// each kv_head of `layer`; returns `[kv_heads * group, head_dim]` f32.
    pub fn attend(
        &self,
        cache: &GpuKvCache,
        layer: usize,
        group: usize,
        scale: f32,
        queries: &[f32],
        positions: &[Vec<u32>],
    ) -> Result<Vec<f32>> {
        cache.check_layer(layer)?;
        let h = cache.kv_heads;
        if positions.len() != h {
            return Err(Error::DimensionMismatch {
                expected: h,
                got: positions.len(),
            });
        }
        let mut flat = Vec::with_capacity(positions.iter().map(Vec::len).sum());
        let mut starts = Vec::with_capacity(h + 1);
        starts.push(0u32);
        for p in positions {
            flat.extend_from_slice(p);
            starts.push(flat.len() as u32);
        }
        let launch = self.launch(cache, layer, group, scale, queries, &flat, &starts, 0..h)?;
        let s = &self.dev.stream;
        let out = s
            .clone_dtoh(&launch.out)
            .map_err(|e| gpu_err("download", e))?;
        // A device-to-pageable copy returns when done; the explicit wait also surfaces any
        // asynchronous launch error here, as a typed error.
        s.synchronize().map_err(|e| gpu_err("synchronize", e))?;
        Ok(out)
    }

    /// One decode step of `layer` on CPU and GPU together: per kv_head, the CPU retriever
    /// selects (with its group's queries) while the GPU attends for the previous kv_heads
    /// (launches are asynchronous on the stream; results are read back at the end). Returns
    /// the output (`[kv_heads * group, head_dim]`) and the timings.
    pub fn pipeline(
        &self,
        retriever: &AttentionRetriever,
        cache: &GpuKvCache,
        layer: usize,
        queries: &[f32],
    ) -> Result<(Vec<f32>, PipelineReport)> {
        let c = retriever.config();
        let (h, g, d) = (c.shape.kv_heads, c.group(), c.shape.head_dim);
        if h != cache.kv_heads || d != cache.head_dim {
            return Err(Error::InvalidArgument(
                "the GPU cache and the retriever disagree on kv_heads or head_dim".into(),
            ));
        }
        if queries.len() != h * g * d {
            return Err(Error::DimensionMismatch {
                expected: h * g * d,
                got: queries.len(),
            });
        }
        let start = Instant::now();
        let mut report = PipelineReport::default();
        let mut launches = Vec::with_capacity(h);
        for kv in 0..h {
            let t = Instant::now();
            let pos = retriever.select_head(layer, kv, &queries[kv * g * d..(kv + 1) * g * d])?;
            report.select_s += t.elapsed().as_secs_f64();
            // Only kv_head `kv`'s range of the offset table is non-empty.
            let starts: Vec<u32> = (0..=h)
                .map(|i| if i <= kv { 0 } else { pos.len() as u32 })
                .collect();
            launches.push(self.launch(
                cache,
                layer,
                g,
                c.scale,
                queries,
                &pos,
                &starts,
                kv..kv + 1,
            )?);
        }
        let mut out = vec![0.0f32; h * g * d];
        for (kv, l) in launches.into_iter().enumerate() {
            let o = self
                .dev
                .stream
                .clone_dtoh(&l.out)
                .map_err(|e| gpu_err("download", e))?;
            out[kv * g * d..(kv + 1) * g * d].copy_from_slice(&o[kv * g * d..(kv + 1) * g * d]);
            report.gpu_s += l
                .start
                .elapsed_ms(&l.end)
                .map_err(|e| gpu_err("event", e))? as f64
                / 1e3;
        }
        self.dev
            .stream
            .synchronize()
            .map_err(|e| gpu_err("synchronize", e))?;
        report.total_s = start.elapsed().as_secs_f64();
        Ok((out, report))
    }

    /// Validates and launches the kernel for the query heads of kv heads `heads`
    /// asynchronously. `flat` holds the positions, `starts` (`kv_heads + 1`) each kv head's
    /// range in it.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        cache: &GpuKvCache,
        layer: usize,
        group: usize,
        scale: f32,
        queries: &[f32],
        flat: &[u32],
        starts: &[u32],
        heads: std::ops::Range<usize>,
    ) -> Result<Launch> {
        cache.check_layer(layer)?;
        let (h, d) = (cache.kv_heads, cache.head_dim);
        if group == 0 || queries.len() != h * group * d {
            return Err(Error::DimensionMismatch {
                expected: h * group * d,
                got: queries.len(),
            });
        }
        crate::check::check_vectors(queries, d, "queries")?;
        if !scale.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "scale {scale} is not finite"
            )));
        }
        let len = cache.len(layer);
        if let Some(&bad) = flat.iter().find(|&&x| x as usize >= len) {
            return Err(Error::InvalidArgument(format!(
                "position {bad} beyond the GPU cache ({len})"
            )));
        }
        debug_assert_eq!(starts.len(), h + 1);
        // A zero-length device buffer cannot be allocated; no head reads past its range.
        let flat: Vec<u32> = if flat.is_empty() {
            vec![0]
        } else {
            flat.to_vec()
        };
        let s = &self.dev.stream;
        let d_q = s
            .clone_htod(queries)
            .map_err(|e| gpu_err("upload queries", e))?;
        let d_pos = s
            .clone_htod(&flat)
            .map_err(|e| gpu_err("upload positions", e))?;
        let d_starts = s
            .clone_htod(starts)
            .map_err(|e| gpu_err("upload offsets", e))?;
        let mut out = s
            .alloc_zeros::<f32>(h * group * d)
            .map_err(|e| gpu_err("alloc", e))?;
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .dev
            .ctx
            .new_event(timing)
            .map_err(|e| gpu_err("event", e))?;
        let end = self
            .dev
            .ctx
            .new_event(timing)
            .map_err(|e| gpu_err("event", e))?;
        start.record(s).map_err(|e| gpu_err("event", e))?;
        let cfg = LaunchConfig {
            grid_dim: ((heads.len() * group) as u32, 1, 1),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: (WARPS as usize * d * 4) as u32,
        };
        let (hi, gi, di, qh0) = (
            h as i32,
            group as i32,
            d as i32,
            (heads.start * group) as i32,
        );
        let mut args = s.launch_builder(&self.func);
        args.arg(&cache.keys[layer])
            .arg(&cache.values[layer])
            .arg(&d_q)
            .arg(&d_pos)
            .arg(&d_starts)
            .arg(&mut out)
            .arg(&hi)
            .arg(&gi)
            .arg(&di)
            .arg(&scale)
            .arg(&qh0);
        // SAFETY: the arguments match `sparse_attention`'s parameters in order and type: two
        // u16 buffers of capacity * kv_heads * d, f32 queries of kv_heads * group * d, u32
        // positions (all < len <= capacity, checked above) and kv_heads + 1 offsets into
        // them, an f32 output of kv_heads * group * d, i32 kv_heads, group, d, f32 scale and
        // i32 qh0. Blocks cover query heads qh0 .. qh0 + grid <= kv_heads * group, and the
        // dynamic shared memory is WARPS * d floats, as the kernel indexes it. cudarc keeps
        // the buffers alive until the stream has used them.
        unsafe { args.launch(cfg) }.map_err(|e| gpu_err("launch", e))?;
        end.record(s).map_err(|e| gpu_err("event", e))?;
        Ok(Launch { out, start, end })
    }
}

/// An asynchronous launch: its output buffer and the events around it.
struct Launch {
    out: CudaSlice<f32>,
    start: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
}
