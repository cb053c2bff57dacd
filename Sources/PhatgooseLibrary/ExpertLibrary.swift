import PhatgooseFormats

/// One expert of a library, as its adapter config describes it.
public struct ExpertInfo: Sendable {
    public var name: String
    /// Directory relative to the library root.
    public var path: String
    public var config: AdapterConfig

    public init(name: String, path: String, config: AdapterConfig) {
        self.name = name
        self.path = path
        self.config = config
    }
}

/// One expert's LoRA at one module, in the runtime's layout.
public struct ModuleExpert: Sendable {
    public var expert: ExpertIndex
    public var rank: Int
    public var alpha: Double
    /// alpha / r, or alpha / sqrt(r) with rsLoRA.
    public var scale: Float
    /// `lora_A`, [rank, in].
    public var a: WeightTensor
    /// `lora_B` transposed, [rank, out], so the expand kernel streams along the output width.
    public var bTransposed: WeightTensor
    /// The gate vector as stored, [in].
    public var gate: WeightTensor

    /// Bytes of weights (A, B and gate).
    public var byteCount: Int { a.byteCount + bTransposed.byteCount + gate.byteCount }

    public init(expert: ExpertIndex, rank: Int, alpha: Double, scale: Float, a: WeightTensor, bTransposed: WeightTensor, gate: WeightTensor) {
        self.expert = expert
        self.rank = rank
        self.alpha = alpha
        self.scale = scale
        self.a = a
        self.bTransposed = bTransposed
        self.gate = gate
    }
}

/// One routed layer: the experts that adapt it (its candidates, in expert-index order) and their gates.
public struct RoutedModule: Sendable {
    public var name: String
    public var inWidth: Int
    public var outWidth: Int
    public var experts: [ModuleExpert]
    /// Each candidate's gate, layer-normalised (no affine, eps 1e-5) and scaled by 1/sqrt(in): F32 [candidates, in].
    /// Routing scores are then one GEMM against the normalised tokens.
    public var gateMatrix: WeightTensor

    /// A module from its candidates (in ascending expert order); the gate matrix is computed from their gates, by the
    /// same code the loaders use.
    public init(name: String, inWidth: Int, outWidth: Int, experts: [ModuleExpert]) {
        precondition(zip(experts, experts.dropFirst()).allSatisfy { $0.expert < $1.expert }, "candidates must ascend by expert index")
        self.init(name: name, inWidth: inWidth, outWidth: outWidth, experts: experts,
                  gateMatrix: GateMatrixBuilder.build(experts.map(\.gate), inWidth: inWidth))
    }

    init(name: String, inWidth: Int, outWidth: Int, experts: [ModuleExpert], gateMatrix: WeightTensor) {
        self.name = name
        self.inWidth = inWidth
        self.outWidth = outWidth
        self.experts = experts
        self.gateMatrix = gateMatrix
    }

    /// Position of `expert` among this module's candidates.
    public func candidateSlot(of expert: ExpertIndex) -> Int? { experts.firstIndex { $0.expert == expert } }
}

/// An in-memory expert library: experts in index order, routed modules in model order, routing defaults.
///
/// Built only by the validating loaders (``load(path:)``), so every library routes exactly as its files say.
///
/// # Thread safety
/// A value type of immutable storage: safe to share and read from any thread.
public struct ExpertLibrary: Sendable {
    /// Where a library was read from.
    public enum Source: Sendable, Equatable {
        case directory(String)
        case packed(String)

        public var path: String {
            switch self {
            case let .directory(path), let .packed(path): return path
            }
        }
    }

    public var source: Source
    public var experts: [ExpertInfo]
    public var modules: [RoutedModule]
    public var routing: RoutingDefaults
    private var moduleIndex: [String: Int]

    public init(source: Source, experts: [ExpertInfo], modules: [RoutedModule], routing: RoutingDefaults) {
        self.source = source
        self.experts = experts
        self.modules = modules
        self.routing = routing
        var index: [String: Int] = [:]
        for (i, module) in modules.enumerated() { index[module.name] = i }
        self.moduleIndex = index
    }

    /// The module named `name`.
    public func module(named name: String) -> RoutedModule? { moduleIndex[name].map { modules[$0] } }
    /// Position of the module named `name` in ``modules``.
    public func moduleIndex(of name: String) -> Int? { moduleIndex[name] }

    /// Bytes of all weights and gates as stored.
    public var weightByteCount: Int { modules.reduce(0) { $0 + $1.experts.reduce(0) { $0 + $1.byteCount } } }

    /// Opens a library directory or a packed library file.
    public static func load(path: String) throws -> ExpertLibrary {
        if isDirectory(path) { return try loadDirectory(path) }
        return try loadPacked(path)
    }
}
