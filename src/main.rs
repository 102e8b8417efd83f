/// mimalloc instead of glibc's malloc: a mount decodes its index and builds
/// its inode tree as ~100k small allocations in fresh memory, on the path
/// that `mount` waits for; mimalloc makes them and faults their pages in
/// about 30 ms faster on a 50k-entry archive (`scripts/bench-mount.sh --only start`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cachemount::cli::main()
}
