import PhatgooseLibrary

/// How tokens choose experts. Defaults come from the library's `routing`; options override them.
public struct RoutingOptions: Sendable, Equatable {
    /// Per token, or per sequence (the mean activation of a sequence routes all its tokens).
    public enum Granularity: Sendable, Equatable {
        case token
        /// Consecutive sequences of this many tokens; the last may be shorter.
        case sequence(length: Int)
    }

    public var router: RouterKind
    /// Experts per token (k). Ignored by the uniform router, which takes every candidate.
    public var topK: Int
    public var granularity: Granularity
    /// Arrow: scores are |x . prototype| / temperature (the official default is 10).
    public var arrowTemperature: Float
    /// Arrow: also multiply scores by 1/sqrt(in).
    public var arrowScaled: Bool

    public init(router: RouterKind = .phatgoose, topK: Int = 2, granularity: Granularity = .token,
                arrowTemperature: Float = 10, arrowScaled: Bool = false) {
        self.router = router
        self.topK = topK
        self.granularity = granularity
        self.arrowTemperature = arrowTemperature
        self.arrowScaled = arrowScaled
    }

    /// The library's defaults.
    public init(defaults: RoutingDefaults) {
        self.init(router: defaults.router, topK: defaults.topK)
    }

    /// Output slots per token at a module with `candidates` experts: k for top-k routers, every candidate for uniform.
    public func slotsPerToken(candidates: Int) -> Int {
        router == .uniform ? candidates : topK
    }
}

/// An error routing or applying a layer, naming the tensor or option at fault.
public struct RoutingError: Error, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let name: String
        public init(_ name: String) { self.name = name }
        public var description: String { name }
        /// An option is out of range.
        public static let option = Code("option")
        /// An input tensor does not fit the module it is keyed by.
        public static let input = Code("input")
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}
