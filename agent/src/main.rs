//! `millwright-agent`: see [`millwright_agent::cli`].

// musl's malloc is slow under tract's many small allocations; mimalloc replays the test data
// faster at the same memory (measured in cross/README.md). glibc builds keep glibc's malloc.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    millwright_agent::cli::main()
}
