fn main() {
    eprintln!("berth-controlplane: not built yet (issues 3 and 4)");
    std::process::exit(1);
}
