//! Matrix products, W · x for one token or many: matvec.wgsl (one token, or CPU devices' token
//! loop; it alone fuses the input's RMS norm, the gated activation and RoPE with the KV-cache
//! write) and the tiled matmul.wgsl (GPUs' prefill), both writing through lib/product_out.wgsl.

use super::matrix::{type_define, GpuMatrix};
use super::pipeline::Bind::{self, *};
use super::rope_kv::{KvType, Places, RopeArgs, MAX_SEQ_ROWS};
use super::{grid, Recorder};
use crate::device::{Gpu, GpuError, PipelineKey};
use crate::ggml_type::GgmlType;
use crate::shaders::Defines;
use crate::tuning::MatvecShape;

/// matvec.wgsl's bindings, in order: w, x, y, norm_w, y1, y2, resid, sum, params.
pub const MATVEC_LAYOUT: &[Bind] = &[Read, Read, ReadWrite, Read, ReadWrite, ReadWrite, Read, ReadWrite, Uniform];
/// matmul.wgsl's bindings: matvec.wgsl's (norm_w, resid and sum unused).
pub const MATMUL_LAYOUT: &[Bind] = MATVEC_LAYOUT;

/// What a product reads: x as it is, or x / rms(x) · weight per token (the RMS norm fused in).
#[derive(Clone, Copy)]
pub enum ProductIn<'a> {
    X(&'a wgpu::Buffer),
    RmsNorm {
        x: &'a wgpu::Buffer,
        weight: &'a wgpu::Buffer,
        eps: f32,
    },
    /// A branch's output added back through its own RMS norm and then normed for this
    /// product (Gemma 3): h = resid + rms_norm(branch) · weights[1], stored into `sum`, and the
    /// product reads rms_norm(h) · weights[0]; `weights`: [2][k]. All: [m][k] but `weights`.
    PostNormAdd {
        branch: &'a wgpu::Buffer,
        resid: &'a wgpu::Buffer,
        sum: &'a wgpu::Buffer,
        weights: &'a wgpu::Buffer,
        eps: f32,
    },
}

/// Where a product's rows go (lib/product_out.wgsl): one output per stacked part of the matrix (or
/// one for all of it), added into a residual stream, or through a gated activation.
#[derive(Clone, Copy)]
pub enum ProductOut<'a> {
    Split(&'a [&'a wgpu::Buffer]),
    Residual(&'a wgpu::Buffer),
    Glu {
        out: &'a wgpu::Buffer,
        gelu: bool,
    },
    /// One token's rows into `y`, and the best of each group of rows (value and row id as u32
    /// bits) into `best_values` and `best_ids`, [argmax_slots] of each, for greedy
    /// decoding's argmax to start from (lib/product_out.wgsl's OUT_ARGMAX).
    Argmax {
        y: &'a wgpu::Buffer,
        best_values: &'a wgpu::Buffer,
        best_ids: &'a wgpu::Buffer,
    },
    /// Stacked q, k, v projections: q turned by RoPE into `q`, k turned and v appended to the
    /// KV cache at the tokens' `places` (see `Recorder::fuses_qkv_rope`).
    QkvRope {
        q: &'a wgpu::Buffer,
        k_cache: &'a wgpu::Buffer,
        v_cache: &'a wgpu::Buffer,
        kv: KvType,
        rope: RopeArgs,
        places: Places<'a>,
    },
}

params! {
    /// matvec.wgsl's `struct Params`; matmul.wgsl's is its first nine fields.
    struct ProductParams {
        n_rows: u32,
        k: u32,
        row_bytes: u32,
        row_offset: u32,
        m: u32,
        n_total: u32,
        n0: u32,
        n1: u32,
        eps: f32,
        // OUT_QKV_ROPE
        head_dim: u32,
        n_rot: u32,
        pos0: u32,
        log2_base: f32,
        freq_scale: f32,
        /// The first token: a dispatch covers tokens t_begin..m (`Recorder::tokens_per_dispatch`).
        t_begin: u32,
        /// OUT_QKV_ROPE: the cache row of position 0 (a sequence's slot of a shared cache).
        kv_row0: u32,
        /// OUT_ARGMAX: this chunk's first slot of the best-of lists.
        best0: u32,
        /// OUT_QKV_ROPE into a q8_0 cache: the word at which the caches' scales start.
        kv_scales: u32,
        _pad: [u32; 2],
        /// OUT_QKV_ROPE with SEQ_ROWS: each token's (position, cache row of its position 0).
        seqs: [u32; 2 * MAX_SEQ_ROWS],
    }
}

/// matvec.wgsl's defines for weights of type `ty` in shape `s`.
fn matvec_defines(ty: GgmlType, s: MatvecShape) -> Defines {
    let mut d = Defines::new().flag(&type_define(ty)).value("TPR", format!("{}u", s.tpr)).value("RPI", format!("{}u", s.rpi)).value("WG", format!("{}u", s.wg));
    if ty.block_elems() > 1 {
        d = d.flag("X_VEC4");
    }
    if s.tpr == 1 {
        d = d.flag("ROW_PER_INVOCATION");
    }
    if s.x_broadcast && ty.block_elems() > 1 {
        d = d.flag("X_BROADCAST");
    }
    d
}

/// How many best-of slots `ProductOut::Argmax` writes for the rows of `w` on `gpu`.
pub fn argmax_slots(gpu: &Gpu, w: &GpuMatrix) -> u32 {
    argmax_slots_for(gpu.tuning.matvec, w)
}

/// `argmax_slots` for products of this shape.
fn argmax_slots_for(shape: MatvecShape, w: &GpuMatrix) -> u32 {
    w.chunks.iter().map(|c| argmax_slots_of_chunk(shape, w, c.n_rows)).sum()
}

/// One per row group of a chunk of n_rows, or per workgroup where its lanes share x
/// (X_BROADCAST, one subgroup a workgroup).
fn argmax_slots_of_chunk(shape: MatvecShape, w: &GpuMatrix, n_rows: u32) -> u32 {
    let per = if shape.x_broadcast && w.ty.block_elems() > 1 { shape.rows_per_workgroup() } else { shape.rpi };
    n_rows.div_ceil(per)
}

/// TOKEN_TILE's sizes: tokens a pass (`Tuning::tile_for`).
pub const TILES: [u32; 3] = [2, 3, 4];

/// `d` with TOKEN_TILE, n tokens a pass.
fn tiled_defines(d: Defines, n: u32) -> Defines {
    d.flag("TOKEN_TILE").value("TILE", format!("{n}u"))
}

/// The products' pipelines for every weight type: matvec.wgsl's shapes (the CPU and GPU
/// defaults and the ones tuning tries) and fused modes, matmul.wgsl plain and adding into a
/// residual.
pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for ty in crate::ggml_type::KERNEL_TYPES {
        let d = Defines::new().flag(&type_define(ty));
        keys.push(PipelineKey { file: "matmul.wgsl", entry: "main", defines: d.clone() });
        for (tpr, rpi, wg, x_broadcast) in
            [(1, 1, 64, false), (1, 4, 16, false), (1, 8, 8, false), (1, 8, 8, true), (4, 2, 64, false), (32, 1, 64, false), (64, 2, 256, false)]
        {
            keys.push(PipelineKey { file: "matvec.wgsl", entry: "main", defines: matvec_defines(ty, MatvecShape { tpr, rpi, wg, x_broadcast }) });
        }
        // the fused modes, on the CPU and GPU shapes; CPU prefill's four-token tiles (quantized
        // types) take every mode, the plain one too
        let fused: [&[&str]; 11] = [
            &["NORM_IN"],
            &["NORM_IN", "POST_NORM_ADD"],
            &["NORM_IN", "POST_NORM_ADD", "OUT_GLU"],
            &["NORM_IN", "POST_NORM_ADD", "OUT_GLU", "GLU_GELU"],
            &["OUT_RESIDUAL"],
            &["NORM_IN", "OUT_GLU"],
            &["NORM_IN", "OUT_GLU", "GLU_GELU"],
            &["NORM_IN", "OUT_QKV_ROPE"],
            &["NORM_IN", "OUT_QKV_ROPE", "KV_F16"],
            &["NORM_IN", "OUT_QKV_ROPE", "SEQ_ROWS"],
            &["NORM_IN", "OUT_QKV_ROPE", "KV_F16", "SEQ_ROWS"],
        ];
        // a q8_0 cache's blocks, written by invocations of 8 rows each (`writes_q8_blocks`)
        let q8: [&[&str]; 2] = [&["NORM_IN", "OUT_QKV_ROPE", "KV_Q8"], &["NORM_IN", "OUT_QKV_ROPE", "KV_Q8", "SEQ_ROWS"]];
        for (tpr, rpi, wg, x_broadcast) in [(1, 8, 8, false), (1, 8, 8, true), (32, 2, 64, false)] {
            let d = matvec_defines(ty, MatvecShape { tpr, rpi, wg, x_broadcast });
            let mut with_modes = |d: &Defines, modes: &[&[&str]]| {
                for flags in modes {
                    let defines = flags.iter().fold(d.clone(), |d, f| d.flag(f));
                    keys.push(PipelineKey { file: "matvec.wgsl", entry: "main", defines });
                }
            };
            with_modes(&d, &fused);
            with_modes(&d, &[&["NORM_IN", "OUT_ARGMAX"]]);
            if tpr == 1 {
                with_modes(&d, &q8);
            }
            let tiles = if tpr == 1 && ty.block_elems() > 1 { TILES.as_slice() } else { &[] };
            for &n in tiles {
                let tile = tiled_defines(d.clone(), n);
                with_modes(&tile, &[&[]]);
                with_modes(&tile, &fused);
                with_modes(&tile, &q8);
            }
            // a batch split over dispatches (llvmpipe's loop budget), token loop and tiles
            with_modes(&d.clone().flag("TOKEN_RANGE"), &[&[], &["OUT_RESIDUAL"]]);
            for &n in tiles {
                with_modes(&tiled_defines(d.clone(), n).flag("TOKEN_RANGE"), &[&[], &["OUT_RESIDUAL"]]);
            }
        }
        keys.push(PipelineKey { file: "matmul.wgsl", entry: "main", defines: d.clone().flag("OUT_RESIDUAL") });
    }
    keys
}

impl Recorder<'_> {
    /// y[row] = W[row] · x for one token. x: [k], y: [n_rows].
    pub async fn matvec(&mut self, w: &GpuMatrix, x: &wgpu::Buffer, y: &wgpu::Buffer) -> Result<(), GpuError> {
        self.product(w, ProductIn::X(x), ProductOut::Split(&[y]), 1).await
    }

    /// Y[t][row] = W[row] · X[t] for m tokens. X: [m][k], Y: [m][n_rows].
    pub async fn matmul(&mut self, w: &GpuMatrix, x: &wgpu::Buffer, y: &wgpu::Buffer, m: u32) -> Result<(), GpuError> {
        self.product(w, ProductIn::X(x), ProductOut::Split(&[y]), m).await
    }

    /// The matvec shape this recorder's products take: the device's, or the one forced.
    pub fn matvec_shape(&self) -> MatvecShape {
        self.matvec_shape.unwrap_or(self.gpu.tuning.matvec)
    }

    /// `argmax_slots` for this recorder's matvec shape.
    pub fn argmax_slots(&self, w: &GpuMatrix) -> u32 {
        argmax_slots_for(self.matvec_shape(), w)
    }

    /// Whether `product` runs matvec.wgsl for m tokens (which alone can fuse the input's RMS
    /// norm and the gated activation): always for one token. For more, GPUs run the
    /// shared-memory tiled matmul.wgsl; CPU devices, where shared-memory reads and barriers cost
    /// a per-lane loop and a coroutine switch each, run matvec.wgsl with its token loop instead
    /// (`NOMOAT_MATMUL=tiled` / `rows` overrides the choice).
    fn product_runs_matvec(&self, m: u32) -> bool {
        if m == 1 {
            return true;
        }
        !self.tiled_matmul.unwrap_or(self.gpu.tuning.tiled_matmul)
    }

    /// Whether `ProductOut::QkvRope` applies for a `kv` cache: stacked q, k, v in one binding,
    /// RoPE in adjacent-pair mode on whole heads, every part a whole number of the invocations'
    /// row groups, the matvec path, and a cache written in pairs or `writes_q8_blocks`.
    pub fn fuses_qkv_rope(&self, w: &GpuMatrix, rope: &RopeArgs, m: u32, kv: KvType) -> bool {
        let rpi = self.matvec_shape().paired().rpi;
        self.product_runs_matvec(m)
            && w.chunks.len() == 1
            && w.parts.len() == 3
            && !rope.neox
            && rope.head_dim.is_multiple_of(2)
            && rope.n_rot.is_multiple_of(2)
            && rope.n_rot <= rope.head_dim
            && w.parts.iter().all(|(_, rows)| rows % rpi == 0 && rows % rope.head_dim == 0)
            && (kv.written_in_pairs() || self.writes_q8_blocks(w))
    }

    /// Whether the fused q/k/v product can write a q8_0 cache itself (lib/product_out.wgsl's
    /// store_qkv_q8): an invocation holds 8 rows (CPU devices' shape), so four hold a block of
    /// 32, and every part is whole blocks of 64 rows, so a workgroup's are of one part. GPUs'
    /// shape (a row over 32 invocations) spreads a block over workgroups: rope_kv writes it.
    fn writes_q8_blocks(&self, w: &GpuMatrix) -> bool {
        let s = self.matvec_shape().paired();
        s.tpr == 1 && s.rpi == 8 && s.wg.is_multiple_of(8) && w.parts.iter().all(|(_, rows)| rows % 64 == 0)
    }

    /// Whether prefill's products run matvec.wgsl's TOKEN_TILE (quantized weights).
    fn tiles_tokens(&self) -> bool {
        self.token_tile.unwrap_or(self.gpu.tuning.token_tile)
    }

    /// TOKEN_TILE's tokens a pass for m tokens.
    fn tile_size(&self, m: u32) -> u32 {
        self.tile_tokens.unwrap_or_else(|| self.gpu.tuning.tile_for(m))
    }

    /// Tokens one matvec.wgsl dispatch of `w` takes, so that an invocation's token loop stays
    /// within the device's loop budget. Iterations a row walk takes per token, measured on
    /// lavapipe at k = 8192 (where 64 tokens overran it) with a margin: about k / 3 for float
    /// weights, k / 2 for quantized ones a token at a time, k / 8 a token in TOKEN_TILE's passes
    /// of four, k / 2n in passes of n (a pass's iterations hardly depend on its tokens); split
    /// over TPR invocations. Float rows of 4864 over 64 tokens (a LoRA A of Qwen2.5 0.5B's
    /// ffn_down in a prefill batch) overran it and left later tokens unwritten.
    fn tokens_per_dispatch(&self, w: &GpuMatrix, shape: MatvecShape, tile: Option<u32>, m: u32) -> u32 {
        let Some(budget) = self.gpu.tuning.loop_budget else { return m };
        let divisor = match (w.ty.block_elems() > 1, tile) {
            (false, _) => 3,
            (true, None) => 2,
            (true, Some(n)) => 2 * n as u64,
        };
        let per_token = (w.k as u64).div_ceil(divisor * shape.tpr as u64) + 4;
        // whole passes of TOKEN_TILE's tokens
        let pass = tile.unwrap_or(4);
        ((budget / per_token) as u32 / pass * pass).max(pass).min(m)
    }

    /// The tokens 0..m of a product as (first, end, TOKEN_TILE's tokens a pass, None for the
    /// token loop). Tiled, a batch that ends on a partial pass of 4 takes its last m % 4 tokens
    /// in a dispatch of their own with a tile of as many (at least 2): 6 tokens cost 4 + 2
    /// tokens' multiply-adds rather than 8, at the price of one more dispatch's loads.
    fn token_spans(&self, m: u32, tiled: bool) -> Vec<(u32, u32, Option<u32>)> {
        if !tiled {
            return vec![(0, m, None)];
        }
        let tile = self.tile_size(m);
        let rest = m % tile;
        let forced = self.tile_tokens.is_some() || self.gpu.tuning.tile_tokens.is_some();
        if forced || m < tile || rest == 0 {
            return vec![(0, m, Some(tile))];
        }
        vec![(0, m - rest, Some(tile)), (m - rest, m, Some(rest.max(2)))]
    }

    /// Whether a forward pass over m tokens should fuse each RMS norm into the product that
    /// reads it and the activation and RoPE into the products that feed them: always for one
    /// token; for a block only where prefill tiles its tokens, since untiled every invocation
    /// pays the norm work again, which made fused prefill slower than unfused.
    pub fn fuses_block(&self, m: u32) -> bool {
        m == 1 || (self.product_runs_matvec(m) && self.tiles_tokens())
    }

    /// Whether `ProductOut::Glu` applies: gate and up stacked as two equal parts in one binding,
    /// and the matvec path.
    pub fn fuses_glu(&self, w: &GpuMatrix, m: u32) -> bool {
        self.product_runs_matvec(m) && w.chunks.len() == 1 && w.parts.len() == 2 && w.parts[0].1 == w.parts[1].1
    }

    /// W · input for m tokens, written as `out` says (see lib/product_out.wgsl). X: [m][k].
    /// `ProductIn::RmsNorm` and `ProductOut::Glu` are for one token (or CPU devices), and Glu
    /// needs a one-chunk matrix of two equal parts [gate; up].
    pub async fn product(&mut self, w: &GpuMatrix, input: ProductIn<'_>, out: ProductOut<'_>, m: u32) -> Result<(), GpuError> {
        let runs_matvec = self.product_runs_matvec(m);
        let (x, norm, eps, fold) = match input {
            ProductIn::X(x) => (x, None, 0.0, None),
            ProductIn::RmsNorm { x, weight, eps } => (x, Some(weight), eps, None),
            ProductIn::PostNormAdd { branch, resid, sum, weights, eps } => (branch, Some(weights), eps, Some((resid, sum))),
        };
        let unsupported = |what: &str| Err(GpuError::Unsupported(format!("{what} for '{}'", w.name)));
        if norm.is_some() && !runs_matvec {
            return unsupported("a fused input norm on this device's prefill path");
        }
        let spare = &self.gpu.unused_buffers;
        let (rope, kv_defines, (kv_row0, seqs, _), kv_scales) = match out {
            ProductOut::QkvRope { k_cache, rope, kv, places, .. } => {
                if let Places::PerToken(p) = places {
                    if p.len() != m as usize {
                        return unsupported(&format!("{} places for {m} tokens", p.len()));
                    }
                }
                if !self.fuses_qkv_rope(w, &rope, m, kv) {
                    return unsupported(&format!("RoPE and the write into a {kv} KV cache fused"));
                }
                let d = kv.defines();
                let place_params = places.params()?;
                (Some(rope), if place_params.2 { d.flag("SEQ_ROWS") } else { d }, place_params, kv.scales_word(k_cache, w.parts[1].1))
            }
            _ => (None, Defines::new(), (0, [0; 2 * MAX_SEQ_ROWS], false), 0),
        };
        // outputs y, y1, y2, rows to y and to y1, and the lib/product_out.wgsl mode flags
        let (ys, n0, n1, flags): ([&wgpu::Buffer; 3], u32, u32, &[&str]) = match out {
            ProductOut::Split([y]) => ([*y, &spare[0], &spare[1]], w.n_rows, 0, &[]),
            ProductOut::Split(ys) if ys.len() == w.parts.len() && ys.len() <= 3 => {
                let n = |i: usize| w.parts.get(i).map_or(0, |p| p.1);
                ([ys[0], ys[1], ys.get(2).copied().unwrap_or(&spare[1])], n(0), n(1), &[])
            }
            ProductOut::Split(ys) => return unsupported(&format!("{} outputs for {} stacked parts", ys.len(), w.parts.len())),
            ProductOut::Residual(y) => ([y, &spare[0], &spare[1]], w.n_rows, 0, &["OUT_RESIDUAL"]),
            ProductOut::Argmax { y, best_values, best_ids } => {
                if m != 1 || !runs_matvec {
                    return unsupported(&format!("the best row fused into a product of {m} tokens"));
                }
                ([y, best_values, best_ids], w.n_rows, 0, &["OUT_ARGMAX"])
            }
            ProductOut::Glu { out, gelu } => {
                if !self.fuses_glu(w, m) {
                    return unsupported("a fused gated activation");
                }
                ([out, &spare[0], &spare[1]], w.parts[0].1, 0, if gelu { &["OUT_GLU", "GLU_GELU"] } else { &["OUT_GLU"] })
            }
            // checked by fuses_qkv_rope above
            ProductOut::QkvRope { q, k_cache, v_cache, .. } => ([q, k_cache, v_cache], w.parts[0].1, w.parts[1].1, &["OUT_QKV_ROPE"]),
        };
        let add_mode = |d: Defines| {
            let d = kv_defines.0.iter().fold(d, |d, (k, v)| d.value(k, v));
            let d = flags.iter().fold(d, |d, f| d.flag(f));
            match (norm, fold) {
                (_, Some(_)) => d.flag("NORM_IN").flag("POST_NORM_ADD"),
                (Some(_), None) => d.flag("NORM_IN"),
                _ => d,
            }
        };
        let glu = flags.contains(&"OUT_GLU");
        let pairs = glu || rope.is_some();
        let r = rope.unwrap_or(RopeArgs { n_tokens: m, n_heads: 0, head_dim: 1, n_rot: 0, pos0: 0, neox: false, freq_base: 1.0, freq_scale: 1.0 });
        let mut best0 = 0;
        for c in &w.chunks {
            let params = ProductParams {
                n_rows: c.n_rows,
                k: w.k,
                row_bytes: w.kernel_row_bytes(),
                row_offset: c.first_row,
                m,
                n_total: w.n_rows,
                n0,
                n1,
                eps,
                head_dim: r.head_dim,
                n_rot: r.n_rot,
                pos0: r.pos0,
                log2_base: r.freq_base.log2(),
                freq_scale: r.freq_scale,
                t_begin: 0,
                kv_row0,
                best0,
                kv_scales,
                _pad: [0; 2],
                seqs,
            };
            best0 += argmax_slots_of_chunk(self.matvec_shape(), w, c.n_rows);
            let (resid, sum) = fold.unwrap_or((x, &spare[2]));
            let buffers = [&c.buffer, x, ys[0], norm.unwrap_or(x), ys[1], ys[2], resid, sum];
            if runs_matvec {
                let shape = if pairs { self.matvec_shape().paired() } else { self.matvec_shape() };
                let rows = if glu { n0 * 2 } else { c.n_rows };
                let (gx, gy) = grid(rows.div_ceil(shape.rows_per_workgroup()));
                let defines = add_mode(matvec_defines(w.ty, shape));
                let tiled = m > 1 && self.tiles_tokens() && shape.tpr == 1 && w.ty.block_elems() > 1;
                for (begin, end, tile) in self.token_spans(m, tiled) {
                    let defines = if let Some(n) = tile { tiled_defines(defines.clone(), n) } else { defines.clone() };
                    let key = PipelineKey { file: "matvec.wgsl", entry: "main", defines };
                    let per = self.tokens_per_dispatch(w, shape, tile, end - begin);
                    if begin == 0 && end == m && per >= m {
                        self.dispatch(key, &buffers, &params, (gx, gy, 1)).await?;
                        continue;
                    }
                    let key = PipelineKey { defines: key.defines.flag("TOKEN_RANGE"), ..key };
                    for t_begin in (begin..end).step_by(per as usize) {
                        let part = ProductParams { t_begin, m: (t_begin + per).min(end), ..params };
                        self.dispatch(key.clone(), &buffers, &part, (gx, gy, 1)).await?;
                    }
                }
            } else {
                let key = PipelineKey { file: "matmul.wgsl", entry: "main", defines: add_mode(w.defines()) };
                self.dispatch(key, &buffers, &params, (c.n_rows.div_ceil(64), m.div_ceil(32), 1)).await?;
            }
        }
        Ok(())
    }
}
