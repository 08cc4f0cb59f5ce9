use clap::Parser;

// Request handling allocates many small short-lived buffers; mimalloc serves them faster than
// the system allocator (see bench/).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ozone::cli::main(ozone::cli::Cli::parse())
}
