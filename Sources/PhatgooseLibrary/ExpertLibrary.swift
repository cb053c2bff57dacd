import PhatgooseFormats

/// One expert of a library, as its adapter config describes it.
public struct ExpertInfo: Sendable {
    /// The expert's name: its `library.json` entry or, without one, its subdirectory's name.
    public var name: String
    /// Directory relative to the library root.
    public var path: String
    /// The expert's parsed `adapter_config.json`.
    public var config: AdapterConfig

    /// Creates an expert description from its parts.
    public init(name: String, path: String, config: AdapterConfig) {
        self.name = name
        self.path = path
        self.config = config
    }
}

/// One expert's LoRA at one module, in the runtime's layout.
public struct ModuleExpert: Sendable {
    /// The expert this LoRA belongs to.
    public var expert: ExpertIndex
    /// The LoRA rank r at this module (after `rank_pattern`).
    public var rank: Int
    /// The LoRA alpha at this module (after `alpha_pattern`).
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

    /// Creates a module expert from its parts; `scale` is used as given, not derived from `rank` and `alpha`.
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
    /// The module's name: its adapter keys without the `base_model.model.` prefix and the `.lora_A.weight` suffix.
    public var name: String
    /// Input width: the length of a token's activation row.
    public var inWidth: Int
    /// Output width: the length of the delta row each token gets.
    public var outWidth: Int
    /// The candidates, ascending by expert index.
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
        /// A library directory (with `library.json` or expert subdirectories) at this path.
        case directory(String)
        /// A packed single-file library at this path.
        case packed(String)

        /// The path the library was read from.
        public var path: String {
            switch self {
            case let .directory(path), let .packed(path): return path
            }
        }
    }

    /// Where the library was read from.
    public var source: Source
    /// Every expert, in index order.
    public var experts: [ExpertInfo]
    /// The routed modules, in model order.
    public var modules: [RoutedModule]
    /// The routing defaults from `library.json` (`RoutingDefaults()` without one).
    public var routing: RoutingDefaults
    private var moduleIndex: [String: Int]

    /// Creates a library from its parts, indexing the modules by name. It does not validate them; ``load(path:)`` does.
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
