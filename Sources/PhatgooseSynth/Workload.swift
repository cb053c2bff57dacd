import PhatgooseFormats

/// The canonical single-layer workloads (docs/performance.md): one routed layer, N experts, T tokens, top-k, rank.
public struct Workload: Sendable, Equatable {
    /// The workload's name (`W1` ... `W4` for the canonical ones).
    public var name: String
    /// Experts adapting the layer.
    public var experts: Int
    /// The layer's input width.
    public var inWidth: Int
    /// The layer's output width.
    public var outWidth: Int
    /// Tokens per call.
    public var tokens: Int
    /// Experts per token.
    public var topK: Int
    /// LoRA rank of every expert.
    public var rank: Int

    /// Creates a workload from its parts.
    public init(name: String, experts: Int, inWidth: Int, outWidth: Int, tokens: Int, topK: Int = 2, rank: Int = 16) {
        self.name = name
        self.experts = experts
        self.inWidth = inWidth
        self.outWidth = outWidth
        self.tokens = tokens
        self.topK = topK
        self.rank = rank
    }

    /// The canonical workloads W1 to W4 (see docs/performance.md).
    public static let canonical: [Workload] = [
        Workload(name: "W1", experts: 36, inWidth: 2048, outWidth: 2048, tokens: 512),
        Workload(name: "W2", experts: 166, inWidth: 2048, outWidth: 2048, tokens: 512),
        Workload(name: "W3", experts: 166, inWidth: 2048, outWidth: 2048, tokens: 8),
        Workload(name: "W4", experts: 166, inWidth: 5120, outWidth: 2048, tokens: 512),
    ]

    /// Synth options for this workload's one-layer library.
    public func synthOptions(dtype: DType, seed: UInt64 = 0) -> SynthOptions {
        SynthOptions(shape: ModelShape(name: name, layers: [.init(name: "bench.layer", inWidth: inWidth, outWidth: outWidth)]),
                     experts: experts, rank: rank, weightDType: dtype, seed: seed, topK: topK)
    }

    /// Floating-point operations of one call: LayerNorm, score GEMM, and per assignment a shrink and an expand.
    public var flops: Double {
        let t = Double(tokens), d = Double(inWidth), o = Double(outWidth), r = Double(rank)
        let assignments = t * Double(min(topK, experts))
        return 5 * t * d + 2 * t * Double(experts) * d + assignments * (2 * r * d + 2 * r * o + o)
    }

    /// Bytes a call must move at least: activations in, deltas out, gate matrix, and the weights of the distinct
    /// experts the batch chooses (`activeExperts`) at `weightBytes` per element.
    public func bytes(activeExperts: Int, weightBytes: Int) -> Double {
        let t = Double(tokens), d = Double(inWidth), o = Double(outWidth)
        return 4 * t * d + 8 * t * o + 4 * Double(experts) * d + Double(activeExperts * rank * (inWidth + outWidth) * weightBytes)
    }
}
