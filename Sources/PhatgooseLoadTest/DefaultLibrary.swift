import Foundation
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseSynth

/// The built-in library a load test uses when given none: a synthetic T5-base-shaped library (192 routed layers,
/// every linear layer of attention and feed-forward), 16 experts of rank 16 in BF16, generated deterministically on
/// first use and cached as one packed file. Later runs map the file and start at once.
///
/// The cache directory is `$PHATGOOSE_CACHE`, else `$XDG_CACHE_HOME/phatgoose`, else `~/.cache/phatgoose`; the file
/// name carries every generation parameter and a format version, so a change of either makes a new file. Writing is
/// atomic, so concurrent first runs cannot leave a torn file.
public enum DefaultLibrary {
    /// What is generated.
    public static let synthOptions = SynthOptions(shape: ModelShape.presets["t5-base"]!, experts: 16, rank: 16, alpha: 1,
                                                  weightDType: .bf16, gateDType: .f32, seed: 7, topK: 2)

    /// A short description for reports.
    public static let description = "built-in synthetic T5-base library: 192 routed layers, 16 LoRA experts of rank 16 (BF16)"

    /// The cache directory.
    public static func cacheDirectory(environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        if let dir = environment["PHATGOOSE_CACHE"], !dir.isEmpty { return dir }
        if let xdg = environment["XDG_CACHE_HOME"], !xdg.isEmpty { return xdg + "/phatgoose" }
        let home = environment["HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? NSHomeDirectory()
        return home + "/.cache/phatgoose"
    }

    /// The packed file's name.
    public static var fileName: String {
        let o = synthOptions
        return "default-\(o.shape.name)-\(o.experts)x-r\(o.rank)-\(o.weightDType.rawValue.lowercased())-seed\(o.seed)-v1.phatpack"
    }

    /// The cached library's path, generating it first if missing. `log` hears what happens (for the progress line).
    /// Returns the path and, when it was generated now, how long that took in seconds.
    public static func ensure(directory: String = cacheDirectory(), log: (String) -> Void = { _ in }) throws -> (path: String, generatedSeconds: Double?) {
        let path = directory + "/" + fileName
        if FileManager.default.fileExists(atPath: path) { return (path, nil) }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw LoadTestError(.io, "\(directory): expected a writable cache directory (set PHATGOOSE_CACHE to choose another), found: \(error.localizedDescription)")
        }
        log("generating the \(description) into \(path) (once)")
        let start = Date()
        let library = try Synth.library(synthOptions)
        try library.writePacked(to: path)
        return (path, Date().timeIntervalSince(start))
    }
}
