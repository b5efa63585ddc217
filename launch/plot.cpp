// loom-plot runs/<name> [--out file.png]
// Renders training loss, validation loss and throughput from metrics.jsonl to
// a PNG with gnuplot (Debian's gnuplot-nox).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "framework/error.h"

namespace {

void plot(const std::string& run_dir, const std::string& out_png) {
  std::filesystem::path metrics = std::filesystem::path(run_dir) / "metrics.jsonl";
  std::ifstream in(metrics);
  LOOM_CHECK(in.good()) << "cannot read " << metrics.string() << " (is " << run_dir << " a loom run directory?)";
  std::filesystem::path tmp = std::filesystem::temp_directory_path() / ("loom-plot-" + std::to_string(::getpid()));
  std::filesystem::create_directories(tmp);
  std::ofstream train(tmp / "train.dat"), val(tmp / "val.dat");
  std::string line;
  int64_t line_no = 0, train_points = 0, val_points = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty()) continue;
    nlohmann::json r;
    try {
      r = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      LOOM_FAIL() << metrics.string() << ":" << line_no << ": not JSON: " << e.what();
    }
    if (r.contains("loss") && r["loss"].is_number()) {
      train << r["step"] << " " << r["loss"] << " " << r.value("tokens_per_s", 0.0) << "\n";
      ++train_points;
    }
    if (r.contains("val_loss") && r["val_loss"].is_number()) {
      val << r["step"] << " " << r["val_loss"] << "\n";
      ++val_points;
    }
  }
  train.close();
  val.close();
  LOOM_CHECK(train_points > 0) << metrics.string() << " holds no logged training steps";
  std::ofstream script(tmp / "plot.gp");
  script << "set terminal pngcairo size 1200,500\n"
         << "set output '" << out_png << "'\n"
         << "set multiplot layout 1,2 title '" << std::filesystem::path(run_dir).filename().string() << "'\n"
         << "set xlabel 'step'; set ylabel 'loss'; set grid\n"
         << "plot '" << (tmp / "train.dat").string() << "' using 1:2 with lines title 'train'"
         << (val_points > 0 ? ", '" + (tmp / "val.dat").string() + "' using 1:2 with linespoints title 'val'" : "")
         << "\n"
         << "set ylabel 'tokens/s'\n"
         << "plot '" << (tmp / "train.dat").string() << "' using 1:3 with lines title 'throughput'\n"
         << "unset multiplot\n";
  script.close();
  std::string command = "gnuplot '" + (tmp / "plot.gp").string() + "'";
  int rc = std::system(command.c_str());
  std::filesystem::remove_all(tmp);
  LOOM_CHECK(rc == 0) << "gnuplot failed (exit " << rc << "); install gnuplot-nox (launch/setup.sh does)";
  std::cout << "wrote " << out_png << " (" << train_points << " training points, " << val_points << " eval points)\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"loom-plot: loss and throughput curves of a run"};
  std::string run_dir, out;
  app.add_option("run", run_dir, "run directory (runs/<name>)")->required();
  app.add_option("--out", out, "PNG to write (default: <run>/curves.png)");
  CLI11_PARSE(app, argc, argv);
  if (out.empty()) out = (std::filesystem::path(run_dir) / "curves.png").string();
  try {
    plot(run_dir, out);
  } catch (const std::exception& e) {
    std::cerr << "loom-plot: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
