use clap::Parser;

/// mimalloc instead of the system allocator: fewer cycles per request on the issuance path
/// (BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    jitbroker::main_with(jitbroker::cli::Cli::parse()).await
}
