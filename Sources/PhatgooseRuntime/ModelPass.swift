import PhatgooseKernels

/// A model-shaped forward pass: T tokens through every routed layer of the library, in model order, each layer's
/// output feeding later layers, so the layers really depend on each other.
///
/// The chain: one activation buffer per width (d_model, d_ff, ...), filled with deterministic values at start. A layer
/// reads the buffer of its input width, and its mixture delta is added into the buffer of its output width, where the
/// next layer of that width reads it (T5: q, k, v, o and wo feed d_model; wi_0 and wi_1 feed d_ff, which wo reads).
/// Allocation-free after `init`.
///
/// # Thread safety
/// Owns its buffers: one pass per thread.
public final class ModelPass {
    /// The runtime that applies each layer.
    public let runtime: Runtime
    /// Tokens sent through every layer in each pass.
    public let tokens: Int
    private let layers: [(handle: LayerHandle, inWidth: Int, outWidth: Int)]
    private var buffers: [Int: UnsafeMutablePointer<Float>] = [:]
    private let delta: UnsafeMutablePointer<Float>
    private let widest: Int

    /// Prepares a pass of `tokens` tokens (at least 1) over every module of the runtime's library, allocating
    /// and filling the activation buffers.
    public init(runtime: Runtime, tokens: Int) {
        precondition(tokens >= 1, "a pass needs at least one token")
        self.runtime = runtime
        self.tokens = tokens
        let library = runtime.library
        layers = library.modules.map { (runtime.layer(named: $0.name)!, $0.inWidth, $0.outWidth) }
        var widest = 1
        for (_, inWidth, outWidth) in layers {
            for width in [inWidth, outWidth] where buffers[width] == nil {
                let buffer = UnsafeMutablePointer<Float>.allocate(capacity: tokens * width)
                var state = UInt64(width)
                for i in 0..<(tokens * width) {
                    state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                    buffer[i] = Float(Int32(truncatingIfNeeded: state >> 32)) / Float(1 << 31)
                }
                buffers[width] = buffer
                widest = max(widest, width)
            }
        }
        self.widest = widest
        delta = .allocate(capacity: tokens * widest)
    }

    deinit {
        for buffer in buffers.values { buffer.deallocate() }
        delta.deallocate()
    }

    /// Layers in the pass.
    public var layerCount: Int { layers.count }

    /// One pass over every layer.
    public func run() throws {
        for (handle, inWidth, outWidth) in layers {
            let input = buffers[inWidth]!, output = buffers[outWidth]!
            delta.update(repeating: 0, count: tokens * outWidth)
            try runtime.apply(handle, input: UnsafeBufferPointer(start: input, count: tokens * inWidth), tokens: tokens,
                              output: UnsafeMutableBufferPointer(start: delta, count: tokens * outWidth))
            Kernels.add(delta, into: output, count: tokens * outWidth)
        }
    }

    /// A checksum of the activations (to show passes are deterministic).
    public func checksum() -> Double {
        buffers.keys.sorted().reduce(0.0) { sum, width in
            let buffer = buffers[width]!
            return (0..<(tokens * width)).reduce(sum) { $0 + Double(buffer[$1]) }
        }
    }
}

@available(*, unavailable)
extension ModelPass: Sendable {}
