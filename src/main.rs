/// mimalloc, with large zeroed blocks mapped fresh (see `allocator`).
#[global_allocator]
static ALLOCATOR: cachemount::allocator::Allocator = cachemount::allocator::Allocator;

fn main() -> std::process::ExitCode {
    cachemount::cli::main()
}
