import PhatgooseLibrary

/// Arrow's data-free prototypes: for each expert at a module, the top right-singular vector of B·A (unit length;
/// its sign does not matter because Arrow scores by |x · e|).
///
/// B·A has rank at most r, so the SVD is done in r dimensions: A^T = Q R (modified Gram-Schmidt, twice for
/// accuracy), so B·A = (B R^T) Q^T and the top right-singular vector is Q w, with w the top eigenvector of
/// (B R^T)^T (B R^T), found by cyclic Jacobi rotations. All in Double.
public enum ArrowPrototypes {
    /// Prototypes of every candidate at `module`, F32 [candidates, in] row-major.
    public static func compute(_ module: RoutedModule) -> [Float] {
        var result: [Float] = []
        result.reserveCapacity(module.experts.count * module.inWidth)
        for piece in module.experts {
            result.append(contentsOf: prototype(piece, inWidth: module.inWidth, outWidth: module.outWidth).map { Float($0) })
        }
        return result
    }

    static func prototype(_ piece: ModuleExpert, inWidth: Int, outWidth: Int) -> [Double] {
        let r = piece.rank
        let a = piece.a.floats().map(Double.init)          // [r, in]
        let bt = piece.bTransposed.floats().map(Double.init) // [r, out]
        // Q: r orthonormal vectors of length `in` (rows), R upper triangular with A^T = Q^T-rows * R.
        var q = a
        var rMatrix = [Double](repeating: 0, count: r * r)
        for j in 0..<r {
            for _ in 0..<2 {
                for i in 0..<j {
                    var dot = 0.0
                    for t in 0..<inWidth { dot += q[i * inWidth + t] * q[j * inWidth + t] }
                    rMatrix[i * r + j] += dot
                    for t in 0..<inWidth { q[j * inWidth + t] -= dot * q[i * inWidth + t] }
                }
            }
            var norm = 0.0
            for t in 0..<inWidth { norm += q[j * inWidth + t] * q[j * inWidth + t] }
            norm = norm.squareRoot()
            rMatrix[j * r + j] = norm
            let inverse = norm > 0 ? 1 / norm : 0
            for t in 0..<inWidth { q[j * inWidth + t] *= inverse }
        }
        // M = B R^T, [out, r]: M[o, j] = sum_i B[o, i] R[j, i] = sum_i Bt[i, o] R[j, i].
        var m = [Double](repeating: 0, count: outWidth * r)
        for o in 0..<outWidth {
            for j in 0..<r {
                var sum = 0.0
                for i in j..<r { sum += bt[i * outWidth + o] * rMatrix[j * r + i] }
                m[o * r + j] = sum
            }
        }
        // S = M^T M, [r, r].
        var s = [Double](repeating: 0, count: r * r)
        for i in 0..<r {
            for j in i..<r {
                var sum = 0.0
                for o in 0..<outWidth { sum += m[o * r + i] * m[o * r + j] }
                s[i * r + j] = sum
                s[j * r + i] = sum
            }
        }
        let w = topEigenvector(symmetric: s, size: r)
        var v = [Double](repeating: 0, count: inWidth)
        for j in 0..<r where w[j] != 0 {
            for t in 0..<inWidth { v[t] += w[j] * q[j * inWidth + t] }
        }
        let norm = v.reduce(0) { $0 + $1 * $1 }.squareRoot()
        return norm > 0 ? v.map { $0 / norm } : v
    }

    /// The eigenvector of the largest eigenvalue of a symmetric matrix, by cyclic Jacobi rotations.
    static func topEigenvector(symmetric input: [Double], size n: Int) -> [Double] {
        var a = input
        var v = [Double](repeating: 0, count: n * n)
        for i in 0..<n { v[i * n + i] = 1 }
        for _ in 0..<100 {
            var off = 0.0
            for i in 0..<n { for j in 0..<n where i != j { off += a[i * n + j] * a[i * n + j] } }
            var diagonal = 0.0
            for i in 0..<n { diagonal += a[i * n + i] * a[i * n + i] }
            if off <= 1e-30 * max(diagonal, 1e-300) { break }
            for p in 0..<n {
                for q in (p + 1)..<max(n, p + 1) where a[p * n + q] != 0 {
                    let theta = (a[q * n + q] - a[p * n + p]) / (2 * a[p * n + q])
                    let t = (theta >= 0 ? 1.0 : -1.0) / (abs(theta) + (theta * theta + 1).squareRoot())
                    let c = 1 / (t * t + 1).squareRoot(), s = t * c
                    for k in 0..<n {
                        let akp = a[k * n + p], akq = a[k * n + q]
                        a[k * n + p] = c * akp - s * akq
                        a[k * n + q] = s * akp + c * akq
                    }
                    for k in 0..<n {
                        let apk = a[p * n + k], aqk = a[q * n + k]
                        a[p * n + k] = c * apk - s * aqk
                        a[q * n + k] = s * apk + c * aqk
                    }
                    for k in 0..<n {
                        let vkp = v[k * n + p], vkq = v[k * n + q]
                        v[k * n + p] = c * vkp - s * vkq
                        v[k * n + q] = s * vkp + c * vkq
                    }
                }
            }
        }
        var best = 0
        for i in 1..<max(n, 1) where a[i * n + i] > a[best * n + best] { best = i }
        return (0..<n).map { v[$0 * n + best] }
    }
}
