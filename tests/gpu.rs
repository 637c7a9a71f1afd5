//! The GPU adapter (feature `cuda`). Without a GPU (no driver / NVRTC library, or no device)
//! every test checks the typed `NoDevice` path and says that the GPU checks were skipped;
//! with one (scripts/gpu-check.sh), the GPU output is compared with the CPU reference on the
//! real Gemma data for every layer.
#![cfg(feature = "cuda")]
mod common;

use half::f16;
use pqcache::attention::{AttentionRetriever, AttentionShape, Budget, RetrieverConfig};
use pqcache::gpu::{probe, GpuDevice, GpuKvCache, GpuSparseAttention};
use pqcache::io::dump::AttentionDump;
use pqcache::Error;

/// The device, or the reason there is none (printed by the caller).
fn device() -> Result<GpuDevice, String> {
    match GpuDevice::new(0) {
        Ok(d) => Ok(d),
        Err(Error::NoDevice(why)) => Err(why),
        Err(other) => panic!("a GPU failure other than NoDevice: {other}"),
    }
}

#[test]
fn without_a_gpu_every_entry_point_says_no_device() {
    match probe() {
        Err(Error::NoDevice(why)) => {
            eprintln!("no CUDA here ({why}): checking the NoDevice path");
            assert!(matches!(GpuDevice::new(0), Err(Error::NoDevice(_))));
        }
        Err(other) => panic!("probe gave {other}"),
        Ok(()) => {
            // Libraries present: device 0 opens or is reported missing, never a panic; an
            // absurd ordinal is NoDevice.
            let _ = device();
            assert!(matches!(
                GpuDevice::new(4096),
                Err(Error::NoDevice(_)) | Err(Error::Gpu(_))
            ));
        }
    }
}

/// The relative error `||a - b|| / ||b||` of each `d`-row.
fn worst_rel_err(a: &[f32], b: &[f32], d: usize) -> f64 {
    a.chunks(d)
        .zip(b.chunks(d))
        .map(|(x, y)| {
            let num: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
            let den: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
            (num / den.max(1e-30)).sqrt()
        })
        .fold(0.0, f64::max)
}

#[test]
fn gpu_attention_equals_the_cpu_reference_on_gemma_for_every_layer() {
    let dev = match device() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("GPU check skipped: {why}");
            return;
        }
    };
    let dump = AttentionDump::load(&common::dumps().join("persuasion-2048")).unwrap();
    let (h, g, d, t) = (dump.kv_heads, dump.group_size(), dump.head_dim, dump.tokens);
    let attn = GpuSparseAttention::new(&dev).unwrap();
    for layer in 0..dump.layers.len() {
        let mut cfg = RetrieverConfig::new(AttentionShape {
            layers: 1,
            query_heads: h * g,
            kv_heads: h,
            head_dim: d,
        });
        cfg.budget = Budget::Ratio(0.1);
        cfg.selector = "fastscan:128x4:rerank4".parse().unwrap();
        let mut cpu = AttentionRetriever::new(cfg).unwrap();
        let mut gpu = GpuKvCache::new(&dev, 1, h, d, t).unwrap();
        let half = t / 2;
        // keys(layer, kv) is that head's [token, dim].
        let head = |x: &[f16], from: usize, to: usize| x[from * d..to * d].to_vec();
        let (mut k0, mut v0) = (Vec::new(), Vec::new());
        for kv in 0..h {
            k0.extend(head(dump.keys(layer, kv), 0, half));
            v0.extend(head(dump.values(layer, kv), 0, half));
        }
        cpu.prefill(0, &k0, &v0, &[]).unwrap();
        gpu.prefill(0, &k0, &v0).unwrap();
        for p in half..t {
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for kv in 0..h {
                k.extend(head(dump.keys(layer, kv), p, p + 1));
                v.extend(head(dump.values(layer, kv), p, p + 1));
            }
            cpu.append(0, &k, &v).unwrap();
            gpu.append(0, &k, &v).unwrap();
            if (p + 1 - half) % 256 != 0 {
                continue;
            }
            let mut q = Vec::with_capacity(h * g * d);
            for qh in 0..h * g {
                q.extend(
                    dump.queries(layer, qh)[p * d..(p + 1) * d]
                        .iter()
                        .map(|x| x.to_f32()),
                );
            }
            let positions = cpu.select(0, &q).unwrap();
            let want = cpu.attend_positions(0, &q, &positions).unwrap();
            let got = attn
                .attend(&gpu, 0, g, cpu.config().scale, &q, &positions)
                .unwrap();
            let err = worst_rel_err(&got, &want, d);
            assert!(
                err <= 1e-3,
                "layer {layer} position {p}: relative error {err}"
            );
            let (piped, report) = attn.pipeline(&cpu, &gpu, 0, &q).unwrap();
            assert!(
                worst_rel_err(&piped, &want, d) <= 1e-3,
                "pipeline, layer {layer}"
            );
            eprintln!(
                "layer {layer} pos {p}: rel err {err:.2e}; pipeline select {:.3} ms, gpu {:.3} ms, total {:.3} ms, hidden {:.0} %",
                report.select_s * 1e3,
                report.gpu_s * 1e3,
                report.total_s * 1e3,
                100.0 * report.hidden_fraction()
            );
        }
    }
}

#[test]
fn bad_input_to_the_gpu_adapter_is_a_typed_error() {
    let dev = match device() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("GPU check skipped: {why}");
            return;
        }
    };
    assert!(matches!(
        GpuKvCache::new(&dev, 1, 1, 1024, 8),
        Err(Error::InvalidArgument(_))
    ));
    let mut c = GpuKvCache::new(&dev, 1, 1, 4, 2).unwrap();
    let x = vec![f16::from_f32(1.0); 4];
    c.append(0, &x, &x).unwrap();
    c.append(0, &x, &x).unwrap();
    assert!(
        matches!(c.append(0, &x, &x), Err(Error::InvalidArgument(_))),
        "full"
    );
    assert!(
        matches!(c.append(1, &x, &x), Err(Error::InvalidArgument(_))),
        "layer"
    );
    let a = GpuSparseAttention::new(&dev).unwrap();
    let q = vec![0.5f32; 4];
    assert!(matches!(
        a.attend(&c, 0, 1, 0.5, &q, &[vec![2]]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        a.attend(&c, 0, 1, 0.5, &[f32::NAN; 4], &[vec![0]]),
        Err(Error::NonFinite { .. })
    ));
    // Attention over identical keys is the mean of the values.
    let out = a.attend(&c, 0, 1, 0.5, &q, &[vec![0, 1]]).unwrap();
    assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-6), "{out:?}");
}
