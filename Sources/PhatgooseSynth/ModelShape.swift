/// The routed layers of a model: names and widths, in model order.
public struct ModelShape: Sendable, Equatable {
    /// One routed layer: its module name and widths.
    public struct Layer: Sendable, Equatable {
        /// The module name, as adapter keys name it.
        public var name: String
        /// Input width.
        public var inWidth: Int
        /// Output width.
        public var outWidth: Int

        /// Creates a layer from its parts.
        public init(name: String, inWidth: Int, outWidth: Int) {
            self.name = name
            self.inWidth = inWidth
            self.outWidth = outWidth
        }
    }

    /// The shape's name (for a preset, its key in ``presets``).
    public var name: String
    /// The routed layers, in model order.
    public var layers: [Layer]

    /// Creates a shape from its parts.
    public init(name: String, layers: [Layer]) {
        self.name = name
        self.layers = layers
    }

    /// The presets by name.
    public static let presets: [String: ModelShape] = [
        "t5-xl": t5(name: "t5-xl", blocks: 24, model: 2048, inner: 2048, feedForward: 5120, gated: true),
        "t5-base": t5(name: "t5-base", blocks: 12, model: 768, inner: 768, feedForward: 3072, gated: false),
        "tiny": t5(name: "tiny", blocks: 2, model: 32, inner: 32, feedForward: 64, gated: true),
    ]

    /// A T5 encoder-decoder: every linear layer of attention (q, k, v, o; cross-attention in the decoder) and of the
    /// feed-forward block (wi_0, wi_1, wo when gated as in T5 v1.1/LM-adapted, wi and wo otherwise). T5-XL has 432.
    public static func t5(name: String, blocks: Int, model: Int, inner: Int, feedForward: Int, gated: Bool) -> ModelShape {
        var layers: [Layer] = []
        func attention(_ prefix: String, _ kind: String) {
            for projection in ["q", "k", "v"] {
                layers.append(Layer(name: "\(prefix).\(kind).\(projection)", inWidth: model, outWidth: inner))
            }
            layers.append(Layer(name: "\(prefix).\(kind).o", inWidth: inner, outWidth: model))
        }
        func ffn(_ prefix: String) {
            let wi = gated ? ["wi_0", "wi_1"] : ["wi"]
            for projection in wi {
                layers.append(Layer(name: "\(prefix).DenseReluDense.\(projection)", inWidth: model, outWidth: feedForward))
            }
            layers.append(Layer(name: "\(prefix).DenseReluDense.wo", inWidth: feedForward, outWidth: model))
        }
        for block in 0..<blocks {
            attention("encoder.block.\(block).layer.0", "SelfAttention")
            ffn("encoder.block.\(block).layer.1")
        }
        for block in 0..<blocks {
            attention("decoder.block.\(block).layer.0", "SelfAttention")
            attention("decoder.block.\(block).layer.1", "EncDecAttention")
            ffn("decoder.block.\(block).layer.2")
        }
        return ModelShape(name: name, layers: layers)
    }
}
