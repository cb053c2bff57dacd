// swift-tools-version: 6.1
import Foundation
import PackageDescription

// Layering (see docs/architecture.md):
//   CPhatgooseKernels  C: AVX2/FMA kernels with a portable fallback, chosen at run time
//   PhatgooseFormats   JSON, safetensors, PEFT config, manifest, packed format (pure)
//   PhatgooseKernels   Swift face of the C kernels (pure)
//   PhatgooseLibrary   the in-memory expert library: loading, validation, packing (pure)
//   PhatgooseRouting   routers, dispatch plan, single-threaded executor (pure)
//   PhatgooseRuntime   the only module that may own threads
//   PhatgooseSynth     synthetic libraries and activations
//   PhatgooseProfiling observers of the runtime (tracing ring, phase accounting, swift-metrics), Chrome trace,
//                      HTML report, CSV, run comparison; the runtime never imports it
//   PhatgooseLoadTest  the model-shaped load generator (closed and open loop), its report and Prometheus export
//   CMPI               OpenMPI's C API (system library, pkg-config `ompi`), declared only where OpenMPI is found
//   PhatgooseDistributed experts sharded over the ranks of an MPI world (docs/scale-out.md); without OpenMPI it
//                      builds too, and opening a distributed runtime fails with a message saying so
//   phatgoose          the command-line tool
//   CPhatgoose         C: include/phatgoose.h (the C ABI) and its plain-C parts (versions, per-thread errors)
//   PhatgooseC         the C ABI in Swift (`@c @implementation`, checked against the header); product PhatgooseC
//                      is libPhatgooseC.so, installed as libphatgoose.so by scripts/install.sh (a product named
//                      `phatgoose` would collide with the executable's)
// No target uses unsafe flags, so the products build as a dependency of other packages.

// OpenMPI is used when its pkg-config file is found (Debian: libopenmpi-dev); PHATGOOSE_MPI=0 builds without it
// and PHATGOOSE_MPI=1 insists on it.
let mpi: Bool = {
    if let forced = ProcessInfo.processInfo.environment["PHATGOOSE_MPI"] { return forced != "0" }
    let triples = ["x86_64-linux-gnu", "aarch64-linux-gnu", "powerpc64le-linux-gnu", "riscv64-linux-gnu"]
    let directories = triples.map { "/usr/lib/\($0)/pkgconfig" } + ["/usr/lib/pkgconfig", "/usr/lib64/pkgconfig", "/usr/local/lib/pkgconfig",
                                                                    "/usr/share/pkgconfig", "/opt/homebrew/lib/pkgconfig"]
    return directories.contains { FileManager.default.fileExists(atPath: $0 + "/ompi.pc") }
}()
let mpiTargets: [Target] = mpi ? [.systemLibrary(name: "CMPI", pkgConfig: "ompi", providers: [.apt(["libopenmpi-dev"])])] : []
let mpiDependency: [Target.Dependency] = mpi ? ["CMPI"] : []

let package = Package(
    name: "Phatgoose",
    products: [
        .library(
            name: "Phatgoose",
            targets: ["PhatgooseFormats", "PhatgooseKernels", "PhatgooseLibrary", "PhatgooseRouting", "PhatgooseRuntime"]
        ),
        .library(name: "PhatgooseSynth", targets: ["PhatgooseSynth"]),
        .library(name: "PhatgooseProfiling", targets: ["PhatgooseProfiling"]),
        .library(name: "PhatgooseDistributed", targets: ["PhatgooseDistributed"]),
        .executable(name: "phatgoose", targets: ["phatgoose"]),
        .library(name: "PhatgooseC", type: .dynamic, targets: ["PhatgooseC"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: mpiTargets + [
        .target(name: "CPhatgooseKernels"),
        .target(name: "CPhatgooseSystem"),
        .systemLibrary(name: "CNuma", providers: [.apt(["libnuma-dev"])]),
        .target(name: "PhatgooseFormats", dependencies: ["CPhatgooseKernels", "CPhatgooseSystem"]),
        .target(name: "PhatgooseKernels", dependencies: ["CPhatgooseKernels", "PhatgooseFormats"]),
        .target(name: "PhatgooseLibrary", dependencies: ["PhatgooseFormats", "PhatgooseKernels"]),
        .target(
            name: "PhatgooseRouting",
            dependencies: ["PhatgooseFormats", "PhatgooseKernels", "PhatgooseLibrary"],
            // O(n) invariant checks of the dispatch plan compile into debug builds (the tests) only.
            swiftSettings: [.define("PHATGOOSE_CHECK_INVARIANTS", .when(configuration: .debug))]
        ),
        .target(
            name: "PhatgooseRuntime",
            dependencies: ["CNuma", "CPhatgooseSystem", "PhatgooseFormats", "PhatgooseKernels", "PhatgooseRouting", "PhatgooseLibrary"]
        ),
        .target(
            name: "PhatgooseDistributed",
            dependencies: ["PhatgooseFormats", "PhatgooseKernels", "PhatgooseLibrary", "PhatgooseRouting", "PhatgooseRuntime"] + mpiDependency
        ),
        .target(name: "PhatgooseSynth", dependencies: ["PhatgooseFormats", "PhatgooseKernels", "PhatgooseLibrary"]),
        .target(
            name: "PhatgooseProfiling",
            dependencies: [
                "PhatgooseFormats", "PhatgooseLibrary", "PhatgooseRuntime",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ]
        ),
        .target(
            name: "PhatgooseLoadTest",
            dependencies: [
                "PhatgooseFormats", "PhatgooseKernels", "PhatgooseLibrary", "PhatgooseRouting", "PhatgooseRuntime", "PhatgooseSynth",
                "PhatgooseProfiling", "PhatgooseDistributed",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        .target(name: "CPhatgoose"),
        .target(name: "PhatgooseC", dependencies: ["CPhatgoose", "PhatgooseFormats", "PhatgooseLibrary", "PhatgooseRouting", "PhatgooseRuntime", "PhatgooseDistributed"]),
        .executableTarget(
            name: "phatgoose",
            dependencies: [
                "CPhatgoose", "PhatgooseFormats", "PhatgooseKernels", "PhatgooseLibrary", "PhatgooseRouting", "PhatgooseRuntime", "PhatgooseSynth",
                "PhatgooseProfiling", "PhatgooseLoadTest", "PhatgooseDistributed",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "PhatgooseTests",
            dependencies: [
                "CPhatgooseKernels", "PhatgooseFormats", "PhatgooseKernels", "PhatgooseLibrary", "PhatgooseRouting",
                "PhatgooseRuntime", "PhatgooseSynth", "PhatgooseProfiling", "PhatgooseLoadTest", "CPhatgoose", "CPhatgooseSystem", "PhatgooseC", "PhatgooseDistributed",
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: [.define("PHATGOOSE_CHECK_INVARIANTS")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
