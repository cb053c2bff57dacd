import PhatgooseLibrary
import PhatgooseRuntime

/// One request: `tokens` tokens through every routed layer, leaning towards `profileExpert`.
public struct RequestSpec: Sendable, Equatable {
    public enum Kind: String, Sendable { case decode, prefill }
    public var index: Int
    public var kind: Kind
    public var tokens: Int
    public var profileExpert: Int
    /// Where this request's tokens start in the noise pool (one offset per request; token t starts at
    /// `noiseOffset + 7919 * t` modulo the pool).
    public var noiseOffset: Int
}

/// The model-shaped workload: what a request computes, layer after layer, and the requests of a run.
///
/// A request is T tokens passing every routed layer of the library in model order (the library's module order).
/// Layer l reads x_l [T, in_l] and the runtime adds its mixture delta d_l [T, out_l]; the next layer's input is
///
///     h_l     = R(x_l, out_l) + d_l                                  (a residual: the input carried to the output width)
///     x_{l+1} = N( R(h_l, in_{l+1}) + a * sqrt(in_{l+1}) * g_{l+1}(e) )
///
/// where R(v, w) maps a row to width w deterministically and cheaply (w > width: tile the row cyclically; w <
/// width: fold it, summing the elements congruent modulo w and scaling by sqrt(w / width) to keep unit variance; w =
/// width: the row itself), N scales each row to unit root-mean-square, `a` is the affinity times a per-layer factor
/// drawn once from [0.25, 1.75] (routing is sharper at some layers than others), and g_{l+1}(e) the
/// runtime's normalised gate row (LN(gate) / sqrt(in)) of the request's profile expert e (no term when e does not
/// adapt the layer). So every layer's input depends on every earlier layer's output, values stay bounded over
/// hundreds of layers, and, as with real tasks, a request's tokens lean towards its expert and its expert's
/// neighbours while each token still routes on its own. x_0 is noise from a fixed pool plus the same gate term.
/// The glue costs a few passes over [T, width] per layer, against the runtime's ~100 flops per element.
///
/// Requests are drawn from (seed, index): decode-like with probability `decodeFraction` (T uniform in
/// `decodeTokens`), else prefill-like; the profile expert by Zipf(`skew`) over expert indices.
///
/// # Thread safety
/// Immutable after `init`; shared by every client thread. The gate rows point into the library's gate matrices,
/// which `library` keeps alive.
public final class ModelWorkload: @unchecked Sendable {
    struct Layer {
        /// The module's index in the library.
        var index: Int
        var inWidth: Int
        var outWidth: Int
        var slots: Int
        /// The module's normalised gate matrix, F32 [candidates, in], rows scaled by 1/sqrt(in).
        var gates: UnsafePointer<Float>
        /// Candidate row of each expert index, -1 when the expert does not adapt the layer.
        var candidateRow: [Int32]
        /// This layer's share of the affinity: routing is sharper at some layers than at others.
        var affinityScale: Float
    }

    public let library: ExpertLibrary
    public let options: LoadTestOptions
    let layers: [Layer]
    /// N(0, 1) values; `poolSize + widest` long so a row never wraps.
    let noise: [Float]
    let poolSize = 65_521
    /// Cumulative Zipf weights over expert indices.
    let profileCDF: [Double]
    public let widest: Int
    public let maxSlots: Int

    /// The workload of `runtime`'s library. Throws when the library has no routed layer.
    public convenience init(runtime: Runtime, options: LoadTestOptions) throws {
        try self.init(target: LocalTarget(runtime: runtime), library: runtime.library, options: options)
    }

    /// The workload of `library` served by `target`. Throws when the library has no routed layer.
    public init(target: any LoadTarget, library: ExpertLibrary, options: LoadTestOptions) throws {
        guard !library.modules.isEmpty else { throw LoadTestError(.library, "\(library.source.path): expected at least one routed layer, found none") }
        self.library = library
        self.options = options
        var layers: [Layer] = []
        var widest = 1, maxSlots = 1
        for (index, module) in library.modules.enumerated() {
            guard module.gateMatrix.dtype == .f32, module.gateMatrix.shape == [module.experts.count, module.inWidth] else {
                throw LoadTestError(.library, "\(library.source.path): module \(module.name): expected an F32 gate matrix [\(module.experts.count), \(module.inWidth)], found \(module.gateMatrix.dtype) \(module.gateMatrix.shape)")
            }
            var rows = [Int32](repeating: -1, count: library.experts.count)
            for (c, piece) in module.experts.enumerated() where piece.expert.int < rows.count { rows[piece.expert.int] = Int32(c) }
            let slots = try target.slots(ofLayer: index)
            var sharpness = LoadRandom(options.seed, 0x5C, UInt64(layers.count))
            layers.append(Layer(index: index, inWidth: module.inWidth, outWidth: module.outWidth, slots: slots,
                                gates: module.gateMatrix.pointer.assumingMemoryBound(to: Float.self), candidateRow: rows,
                                affinityScale: Float(0.25 + 1.5 * sharpness.unit())))
            widest = max(widest, module.inWidth, module.outWidth)
            maxSlots = max(maxSlots, slots)
        }
        self.layers = layers
        self.widest = widest
        self.maxSlots = maxSlots
        var random = LoadRandom(options.seed, 0x40)
        noise = (0..<(poolSize + widest)).map { _ in Float(random.normal()) }
        let weights = (0..<max(1, library.experts.count)).map { 1 / pow(Double($0 + 1), options.skew) }
        let total = weights.reduce(0, +)
        var running = 0.0
        profileCDF = weights.map { running += $0 / total; return running }
    }

    /// Routed layers per request.
    public var layerCount: Int { layers.count }

    /// Request number `index` of the run.
    public func request(_ index: Int) -> RequestSpec {
        var random = LoadRandom(options.seed, 0x52, UInt64(index))
        let decode = random.unit() < options.decodeFraction
        let tokens = random.integer(in: decode ? options.decodeTokens : options.prefillTokens)
        let u = random.unit()
        let expert = profileCDF.firstIndex { u < $0 } ?? (profileCDF.count - 1)
        return RequestSpec(index: index, kind: decode ? .decode : .prefill, tokens: tokens, profileExpert: expert,
                           noiseOffset: Int(random.next() % UInt64(poolSize)))
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
