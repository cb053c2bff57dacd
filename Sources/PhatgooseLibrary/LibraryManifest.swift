import PhatgooseFormats

/// The router a library names as its default.
public enum RouterKind: String, Sendable, CaseIterable {
    /// PHATGOOSE: softmax over the scores of the layer-normalised token against each expert's normalised gate, then top-k.
    case phatgoose
    /// Arrow: softmax over |token · prototype| / temperature, with each expert's top right-singular vector of B·A as its prototype, then top-k.
    case arrow
    /// Every candidate, each with weight 1 / candidates.
    case uniform
}

/// Routing defaults from `library.json` (`routing`), overridable by options.
public struct RoutingDefaults: Sendable, Equatable {
    /// The router (`router`; default `phatgoose`).
    public var router: RouterKind
    /// Experts per token (`top_k`; default 2).
    public var topK: Int

    /// Creates routing defaults; the argument defaults are those used when `library.json` omits them.
    public init(router: RouterKind = .phatgoose, topK: Int = 2) {
        self.router = router
        self.topK = topK
    }
}

/// `library.json`: the experts in index order, where they live, and the routing defaults.
///
/// Load rules: `format` must be `"phatgoose-library"` and `version` the integer 1; `experts` a non-empty list of
/// objects with string `name` and `path`; names unique, paths unique, relative and inside the library directory
/// (no `..` that leaves it, no absolute path); `routing` optional with `router` one of `phatgoose`, `arrow`, `uniform`
/// and `top_k` an integer >= 1. Unknown fields are ignored.
public struct LibraryManifest: Sendable {
    /// One element of `experts`: an expert's name and directory.
    public struct Entry: Sendable, Equatable {
        /// The expert's name, unique in the library.
        public var name: String
        /// The expert's directory relative to the library root (normalised when parsed: no `.` or `..`).
        public var path: String

        /// Creates an entry from its parts.
        public init(name: String, path: String) {
            self.name = name
            self.path = path
        }
    }

    /// The experts, in index order.
    public var experts: [Entry]
    /// The routing defaults; `RoutingDefaults()` when `routing` is absent.
    public var routing: RoutingDefaults

    /// Creates a manifest from its parts, without validation.
    public init(experts: [Entry], routing: RoutingDefaults) {
        self.experts = experts
        self.routing = routing
    }

    /// Parses and validates a manifest document.
    public init(document: JSONValue, file: String) throws(LibraryError) {
        func failure(_ field: String, _ message: String) -> LibraryError {
            LibraryError(.manifest, file: file, subject: "field \"\(field)\"", message)
        }
        guard case .object = document else {
            throw LibraryError(.manifest, file: file, "expected a JSON object, found \(document.kindDescription)")
        }
        guard case let .string(format)? = document["format"] else {
            throw failure("format", "expected \"phatgoose-library\", found \(document["format"]?.kindDescription ?? "nothing")")
        }
        guard format == "phatgoose-library" else { throw failure("format", "expected \"phatgoose-library\", found \"\(format)\"") }
        guard case let .number(version)? = document["version"], version.int64 == 1 else {
            throw failure("version", "expected 1, found \(document["version"]?.kindDescription ?? "nothing")")
        }
        guard case let .array(items)? = document["experts"] else {
            throw failure("experts", "expected a list of experts, found \(document["experts"]?.kindDescription ?? "nothing")")
        }
        guard !items.isEmpty else { throw failure("experts", "expected at least one expert, found an empty list") }
        var entries: [Entry] = []
        var names = Set<String>()
        var paths = Set<String>()
        for (i, item) in items.enumerated() {
            guard case let .string(name)? = item["name"], !name.isEmpty else {
                throw failure("experts[\(i)].name", "expected a non-empty string, found \(item["name"]?.kindDescription ?? "nothing")")
            }
            guard case let .string(path)? = item["path"], !path.isEmpty else {
                throw failure("experts[\(i)].path", "expected a non-empty string, found \(item["path"]?.kindDescription ?? "nothing")")
            }
            guard names.insert(name).inserted else { throw failure("experts[\(i)].name", "expected unique names, found \"\(name)\" twice") }
            guard let normalized = Self.normalizedRelativePath(path) else {
                throw failure("experts[\(i)].path", "expected a relative path inside the library directory, found \"\(path)\"")
            }
            guard paths.insert(normalized).inserted else { throw failure("experts[\(i)].path", "expected each expert in its own directory, found \"\(path)\" twice") }
            entries.append(Entry(name: name, path: normalized))
        }
        var routing = RoutingDefaults()
        if let value = document["routing"], value != .null {
            guard case .object = value else { throw failure("routing", "expected an object, found \(value.kindDescription)") }
            if let router = value["router"], router != .null {
                guard case let .string(name) = router, let kind = RouterKind(rawValue: name) else {
                    throw failure("routing.router", "expected one of \(RouterKind.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", ")), found \(router.kindDescription)")
                }
                routing.router = kind
            }
            if let topK = value["top_k"], topK != .null {
                guard case let .number(n) = topK, let k = n.int64 else { throw failure("routing.top_k", "expected an integer >= 1, found \(topK.kindDescription)") }
                guard k >= 1, k <= 1 << 20 else { throw failure("routing.top_k", "expected an integer >= 1, found \(k)") }
                routing.topK = Int(k)
            }
        }
        self.experts = entries
        self.routing = routing
    }

    /// Reads `path`.
    public init(path: String) throws {
        let file = try MappedFile(path: path)
        let document: JSONValue
        do {
            document = try JSONParser.parse(file.bytes)
        } catch {
            throw LibraryError(.manifest, file: path, "expected JSON, found invalid JSON (\(error))")
        }
        try self.init(document: document, file: path)
    }

    /// `path` with `.` and `..` resolved, or nil when it is absolute or leaves its root.
    static func normalizedRelativePath(_ path: String) -> String? {
        guard !path.hasPrefix("/"), !path.contains("\0") else { return nil }
        var parts: [Substring] = []
        for part in path.split(separator: "/", omittingEmptySubsequences: true) {
            switch part {
            case ".": continue
            case "..":
                guard !parts.isEmpty else { return nil }
                parts.removeLast()
            default: parts.append(part)
            }
        }
        guard !parts.isEmpty else { return nil }
        return parts.joined(separator: "/")
    }

    /// The manifest as a JSON document.
    public func document() -> JSONValue {
        .object([
            ("format", .string("phatgoose-library")),
            ("version", .integer(1)),
            ("experts", .array(experts.map { .object([("name", .string($0.name)), ("path", .string($0.path))]) })),
            ("routing", .object([("router", .string(routing.router.rawValue)), ("top_k", .integer(routing.topK))])),
        ])
    }
}
