fn main() {
    eprintln!("berth-csi: not built yet (issue 4)");
    std::process::exit(1);
}
