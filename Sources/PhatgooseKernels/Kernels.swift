import CPhatgooseKernels

/// The numeric kernels, over unsafe buffers: allocation-free, thread-free and deterministic per instruction set
/// (each output element's bits do not depend on batch size, position or tiling).
///
/// On x86-64 the AVX-512 versions of the products (score GEMMs, shrink, expand) and of LayerNorm, and the
/// AVX2/FMA/F16C versions of the rest, are chosen at run time when the CPU has them; otherwise, and on other architectures, portable C. No unsafe build flag is involved, so the package stays usable as a dependency.
public enum Kernels {
    /// The instruction sets the kernels can use.
    public enum ISA: Int32, Sendable, CaseIterable, CustomStringConvertible {
        /// Portable C, available on every CPU.
        case portable = 0
        /// x86-64 AVX2 with FMA and F16C.
        case avx2 = 1
        /// x86-64 AVX-512 F, BW and VL for the products and LayerNorm (the other kernels run their AVX2 versions).
        case avx512 = 2
        /// The kernels' name for the instruction set: `portable`, `avx2` or `avx512`.
        public var description: String { String(cString: pg_isa_name(rawValue)) }
    }

    /// The best instruction set this CPU supports.
    public static var bestISA: ISA { ISA(rawValue: pg_isa_best()) ?? .portable }
    /// The instruction set in use.
    public static var activeISA: ISA { ISA(rawValue: pg_isa_active()) ?? .portable }

    /// Forces an instruction set for the whole process. Returns false when this CPU lacks it. Must not be called
    /// while kernels run on other threads.
    @discardableResult
    public static func setISA(_ isa: ISA) -> Bool { pg_isa_set(isa.rawValue) == 0 }

    /// Forces an instruction set for kernels called from the calling thread only (nil removes the override), so
    /// tests and benchmarks can compare ISAs while other threads compute. Returns false when this CPU lacks it.
    @discardableResult
    public static func setThreadISA(_ isa: ISA?) -> Bool { pg_isa_set_thread(isa?.rawValue ?? -1) == 0 }

    /// The number of NaN or infinite values among `count` F32 values.
    @inlinable
    public static func nonFiniteCount(_ x: UnsafePointer<Float>, count: Int) -> Int {
        Int(pg_count_nonfinite(x, Int32(PG_DTYPE_F32.rawValue), count))
    }

    /// Row LayerNorm without affine (mean and biased variance over the row; eps added to the variance).
    @inlinable
    public static func layerNormRows(_ x: UnsafePointer<Float>, ldx: Int, rows: Int, width: Int, epsilon: Float = 1e-5,
                                     into out: UnsafeMutablePointer<Float>, ldo: Int) {
        precondition(ldx >= width && ldo >= width, "leading dimensions must cover the row width")
        pg_layernorm_rows(x, ldx, rows, width, epsilon, out, ldo)
    }

    /// C[i, j] = alpha * A[i, :] . B[j, :] for A [m, k] and B [n, k].
    @inlinable
    public static func gemmNT(_ a: UnsafePointer<Float>, lda: Int, m: Int, _ b: UnsafePointer<Float>, ldb: Int, n: Int, k: Int,
                              alpha: Float = 1, into c: UnsafeMutablePointer<Float>, ldc: Int) {
        precondition(lda >= k && ldb >= k && ldc >= n, "leading dimensions too small")
        pg_gemm_nt_f32(a, lda, m, b, ldb, n, k, alpha, c, ldc)
    }

    /// Output columns per panel of a packed matrix (``packPanels(_:ldb:n:k:into:)``).
    public static let panelWidth = Int(PG_PANEL_WIDTH)

    /// Floats ``packPanels(_:ldb:n:k:into:)`` writes for an n x k matrix (n rounded up to ``panelWidth``, times k).
    @inlinable
    public static func panelFloatCount(n: Int, k: Int) -> Int { pg_pack_panel_floats(n, k) }

    /// Packs B [n, k] into column panels for ``gemmPacked(_:lda:m:_:n:k:alpha:into:ldc:)``; `packed` must hold
    /// ``panelFloatCount(n:k:)`` floats and start on a 64-byte boundary.
    @inlinable
    public static func packPanels(_ b: UnsafePointer<Float>, ldb: Int, n: Int, k: Int, into packed: UnsafeMutablePointer<Float>) {
        precondition(ldb >= k, "ldb must cover the row width")
        precondition(Int(bitPattern: packed) % 64 == 0, "packed panels must start on a 64-byte boundary")
        pg_pack_panels(b, ldb, n, k, packed)
    }

    /// C[i, j] = alpha * A[i, :] . B[j, :] for A [m, k] and B [n, k] packed by ``packPanels(_:ldb:n:k:into:)``. To
    /// compute columns from `16p` alone, pass `packed + 16p * k` and `c + 16p`.
    @inlinable
    public static func gemmPacked(_ a: UnsafePointer<Float>, lda: Int, m: Int, _ packed: UnsafePointer<Float>, n: Int, k: Int,
                                  alpha: Float = 1, into c: UnsafeMutablePointer<Float>, ldc: Int) {
        precondition(lda >= k && ldc >= n, "leading dimensions too small")
        precondition(Int(bitPattern: packed) % 64 == 0, "packed panels must start on a 64-byte boundary")
        pg_gemm_packed_f32(a, lda, m, packed, n, k, alpha, c, ldc)
    }

    /// h[i, j] = rowScale[i] * loraScale * x[rows[i], :] . A[j, :], for A [r, dIn] in `aDType`.
    @inlinable
    public static func loraShrink(_ x: UnsafePointer<Float>, ldx: Int, rows: UnsafePointer<Int32>?, count: Int,
                                  a: UnsafeRawPointer, aDType: Int32, rank: Int, inWidth: Int,
                                  rowScale: UnsafePointer<Float>?, loraScale: Float, into h: UnsafeMutablePointer<Float>) {
        precondition(ldx >= inWidth, "ldx must cover the input width")
        pg_lora_shrink(x, ldx, rows, count, a, aDType, rank, inWidth, rowScale, loraScale, h)
    }

    /// y[i, o] = sum_j h[i, j] * Bt[j, o], for Bt [r, dOut] in `bDType` (overwrites y).
    @inlinable
    public static func loraExpand(_ h: UnsafePointer<Float>, count: Int, rank: Int, bTransposed: UnsafeRawPointer, bDType: Int32,
                                  outWidth: Int, into y: UnsafeMutablePointer<Float>, ldy: Int) {
        precondition(ldy >= outWidth, "ldy must cover the output width")
        pg_lora_expand(h, count, rank, bTransposed, bDType, outWidth, y, ldy)
    }

    /// y[rows[i], o] += sum_j h[i, j] * Bt[j, o]: the value ``loraExpand(_:count:rank:bTransposed:bDType:outWidth:into:ldy:)``
    /// gives, added (one rounding) into row `rows[i]` of y. The `count` entries of `rows` must be distinct and >= 0.
    @inlinable
    public static func loraExpandAdd(_ h: UnsafePointer<Float>, count: Int, rank: Int, bTransposed: UnsafeRawPointer, bDType: Int32,
                                     outWidth: Int, into y: UnsafeMutablePointer<Float>, ldy: Int, rows: UnsafePointer<Int32>) {
        precondition(ldy >= outWidth, "ldy must cover the output width")
        pg_lora_expand_add(h, count, rank, bTransposed, bDType, outWidth, y, ldy, rows)
    }

    /// y += rows[0], then += rows[1], ... over `width` floats, reading and writing y once (the same bits as
    /// ``add(_:into:count:)`` per row, in order).
    @inlinable
    public static func addRows(_ rows: UnsafePointer<UnsafePointer<Float>?>, rowCount: Int, into y: UnsafeMutablePointer<Float>, width: Int) {
        pg_add_rows_f32(y, rows, rowCount, width)
    }

    /// Runs `iterations` rounds of register-only FMA chains with the active instruction set and returns the
    /// floating-point operations done: timed on every core at once, the machine's FMA issue peak.
    public static func fmaProbe(iterations: Int) -> Double { pg_fma_probe(iterations) }

    /// y += x over `count` floats.
    @inlinable
    public static func add(_ x: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, count: Int) {
        pg_add_f32(y, x, count)
    }
}
