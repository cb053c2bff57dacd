// swift-tools-version: 6.1
import PackageDescription

// Benchmarks with package-benchmark (ordo-one/benchmark): kernels, the dispatch plan, one routed layer for the
// canonical workloads, and a model pass, with malloc counters proving the hot path allocates nothing.
//   swift package benchmark                                   run everything
//   swift package benchmark thresholds check                  compare with the p90 thresholds in Thresholds/
//   swift package --allow-writing-to-package-directory benchmark thresholds update
let package = Package(
    name: "PhatgooseBenchmarks",
    dependencies: [
        .package(name: "Phatgoose", path: "../"),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "PhatgooseBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "Phatgoose", package: "Phatgoose"),
                .product(name: "PhatgooseSynth", package: "Phatgoose"),
            ],
            path: "Benchmarks/PhatgooseBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
