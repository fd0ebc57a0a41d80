// The `limoe` program end to end: exit codes, one-line errors naming the problem, no half-written outputs,
// `embed` against the PyTorch golden files, `inspect` counts, and exact resume of `train`.
#include <doctest/doctest.h>

#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <filesystem>
#include <fstream>
#include <limoe/io/safetensors.hpp>
#include <limoe/model/checkpoint.hpp>
#include <limoe/model/presets.hpp>
#include <limoe/data/fashion_mnist.hpp>
#include <sstream>
#include <string>

#include "support/skip.hpp"

namespace fs = std::filesystem;
using namespace limoe;

namespace {
const std::string kCli = LIMOE_CLI_PATH;
const std::string kGolden = std::string(LIMOE_TEST_DATA_DIR) + "/golden/";

struct Run {
  int code;
  std::string out, err;
};

fs::path scratch() {
  static const fs::path dir = [] {
    fs::path d = fs::temp_directory_path() / ("limoe_cli_test_" + std::to_string(::getpid()));
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

std::string slurp(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

Run run(const std::string& args) {
  const fs::path o = scratch() / "stdout.txt", e = scratch() / "stderr.txt";
  const std::string cmd = kCli + " " + args + " > " + o.string() + " 2> " + e.string();
  const int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(o), slurp(e)};
}

// The same, run from folder `dir` (relative paths in args are relative to it).
Run run_in(const fs::path& dir, const std::string& args) {
  const fs::path o = scratch() / "stdout.txt", e = scratch() / "stderr.txt";
  const std::string cmd = "cd '" + dir.string() + "' && " + kCli + " " + args + " > " + o.string() + " 2> " + e.string();
  const int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(o), slurp(e)};
}

// A failing command: exit 2, one line naming the problem, and no output file.
void expect_failure(const std::string& args, const std::string& needle, const fs::path& output = {}) {
  const Run r = run(args);
  INFO("limoe ", args, "\nstderr: ", r.err);
  CHECK(r.code == 2);
  CHECK(r.err.find(needle) != std::string::npos);
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  if (!output.empty()) CHECK_FALSE(fs::exists(output));
  for (const auto& entry : fs::directory_iterator(scratch()))
    CHECK_MESSAGE(entry.path().string().find(".tmp.") == std::string::npos, "temporary file left: ", entry.path());
}

// Copies a checkpoint, applying `edit` to its tensors and replacing the metadata values `md` names.
void rewrite(const fs::path& from, const fs::path& to,
             const std::function<void(io::SafetensorsWriter&, const io::SafetensorsReader&)>& edit,
             const std::map<std::string, std::string>& md = {}) {
  const auto r = io::SafetensorsReader::open(from.string());
  io::SafetensorsWriter w;
  edit(w, r);
  for (const auto& name : r.names())
    if (!w.has(name)) {
      const auto v = r.read_f32_flat(name);
      w.add(name, r.info(name).shape, std::span<const float>(v));
    }
  for (const auto& [k, v] : r.metadata()) w.set_metadata(k, md.count(k) ? md.at(k) : v);
  for (const auto& [k, v] : md)
    if (!r.metadata().count(k)) w.set_metadata(k, v);
  w.write(to.string());
}
void with_metadata(const fs::path& from, const fs::path& to, const std::map<std::string, std::string>& md) {
  rewrite(from, to, [](io::SafetensorsWriter&, const io::SafetensorsReader&) {}, md);
}
}  // namespace

TEST_CASE("inspect: H/14 matches the paper's size; unknown names fail cleanly") {
  const Run r = run("inspect H/14 --json");
  CHECK(r.code == 0);
  CHECK(r.out.find("\"params_total\":5593122561") != std::string::npos);
  CHECK(run("inspect S/32").code == 0);
  expect_failure("inspect X/99", "unknown preset");
  expect_failure("nonsense", "unknown command");
  CHECK(run("--help").code == 0);
  CHECK(run("embed --help").code == 0);
}

TEST_CASE("embed: reproduces the PyTorch golden embeddings and routes") {
  for (const char* c : {"tiny_map", "tiny_k2", "tiny_vanilla"}) {
    CAPTURE(c);
    const fs::path out = scratch() / (std::string(c) + ".emb.safetensors");
    const Run r = run("embed --checkpoint " + kGolden + c + ".ckpt.safetensors --input " + kGolden + c +
                      ".io.safetensors --output " + out.string());
    REQUIRE_MESSAGE(r.code == 0, r.err);
    const auto got = io::SafetensorsReader::open(out.string());
    const auto want = io::SafetensorsReader::open(kGolden + c + ".io.safetensors");
    for (const char* name : {"img_emb", "txt_emb"}) {
      const auto a = got.read_f32_flat(name), b = want.read_f32_flat(name);
      REQUIRE(a.size() == b.size());
      for (std::size_t i = 0; i < a.size(); ++i) CHECK(std::abs(a[i] - b[i]) < 1e-4f);
    }
    int routes = 0;
    for (const auto& name : got.names())
      if (name.find("_route.") != std::string::npos) {
        ++routes;
        CHECK(got.read_i32_flat(name) == want.read_i32_flat(name));
      }
    CHECK(routes >= 2);
  }
}

TEST_CASE("embed: every bad input exits 2 with a one-line reason and leaves no output") {
  const std::string ck = kGolden + "tiny_map.ckpt.safetensors", in = kGolden + "tiny_map.io.safetensors";
  const fs::path out = scratch() / "bad.safetensors";
  const std::string tail = " --output " + out.string();
  expect_failure("embed --checkpoint /nonexistent.safetensors --input " + in + tail, "nonexistent", out);
  // A path holding a newline (or another control character) is quoted with escapes: the reason stays one line.
  expect_failure("embed --checkpoint '/nonexistent\nsecond\tline.safetensors' --input " + in + tail,
                 "/nonexistent\\nsecond\\tline.safetensors", out);
  expect_failure("'bogus\ncommand'", "unknown command \"bogus\\ncommand\"");
  // A backslash is written as two, so that it cannot be read as the start of an escape.
  expect_failure("'bogus\\ncommand'", "unknown command \"bogus\\\\ncommand\"");
  expect_failure("embed --input " + in + tail, "--checkpoint is required", out);
  expect_failure("embed --checkpoint " + ck + " --input " + in + tail + " --bogus 1", "unknown option --bogus", out);
  expect_failure("embed --checkpoint " + ck + " --input " + in + tail + " --capacity-factor -1", "capacity-factor", out);
  // Groups of 4 tokens at factor 0.1 leave each expert below one slot (C < 1): refused, not rounded up.
  expect_failure("embed --checkpoint " + ck + " --input " + in + tail + " --capacity-factor 0.1 --group-size 4",
                 "raise --capacity-factor (the checkpoint's capacity_factor_eval) or --group-size", out);
  // Without drops any group size runs: the training factor, which embed never routes with, does not refuse it.
  CHECK(run("embed --checkpoint " + ck + " --input " + in + tail + " --capacity-factor 0 --group-size 2").code == 0);
  fs::remove(out);
  // The backend flags: cpu / fp32 run; what cannot run is refused by name, never ignored.
  expect_failure("embed --checkpoint " + ck + " --input " + in + tail + " --device tpu", "cpu or cuda", out);
#if defined(LIMOE_CLI_CUDA)
  expect_failure("bench --workload gemm --device cuda", "model workloads");
#else
  expect_failure("bench --workload gemm --device cuda", "built without the CUDA part");
#endif
  {
    // --device cuda runs on a machine with a GPU and a CUDA build; anywhere else it is one line naming why
    // (no CUDA part, or no usable device with CUDA's reason), and nothing is written.
    const fs::path dir = scratch() / "cudarun";
    const Run r = run("train --preset tiny --steps 1 --batch 4 --data synthetic --quiet --device cuda --out " + dir.string());
    INFO(r.err);
    if (r.code == 0) {
      CHECK(fs::exists(dir / "checkpoint.safetensors"));
    } else {
      CHECK(r.code == 2);
      CHECK(r.err.find("--device cuda") != std::string::npos);
      CHECK((r.err.find("without the CUDA part") != std::string::npos ||
             r.err.find("no usable CUDA device") != std::string::npos));
      CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
      CHECK_FALSE(fs::exists(dir / "checkpoint.safetensors"));
    }
    fs::remove_all(dir);
  }
  expect_failure("bench --workload gemm --precision fp16", "fp32 or bf16");
  {
    const Run r = run("embed --checkpoint " + ck + " --input " + in + tail + " --device cpu --precision fp32");
    INFO(r.err);
    CHECK(r.code == 0);
    CHECK(fs::exists(out));
    fs::remove(out);
  }
  // bf16: the same checkpoint, embeddings within bf16's error of fp32's, the precision in the output's metadata.
  {
    const fs::path o32 = scratch() / "e32.safetensors", o16 = scratch() / "e16.safetensors";
    REQUIRE(run("embed --checkpoint " + ck + " --input " + in + " --output " + o32.string()).code == 0);
    const Run r = run("embed --checkpoint " + ck + " --input " + in + " --output " + o16.string() + " --precision bf16");
    INFO(r.err);
    REQUIRE(r.code == 0);
    const auto a = io::SafetensorsReader::open(o32.string()), b = io::SafetensorsReader::open(o16.string());
    CHECK(b.metadata().at("precision") == "bf16");
    CHECK(a.metadata().at("precision") == "fp32");
    for (const char* name : {"img_emb", "txt_emb"}) {
      const auto x = a.read_f32_flat(name), y = b.read_f32_flat(name);
      REQUIRE(x.size() == y.size());
      double worst = 0;
      for (std::size_t i = 0; i < x.size(); ++i) worst = std::max(worst, std::abs(double(x[i]) - y[i]));
      CAPTURE(name);
      CHECK(worst > 0);      // bf16 ran
      CHECK(worst < 0.05);   // unit vectors, a few chained bf16 products
    }
  }
  // A config file with a misspelt key is refused naming it and the nearest valid key.
  {
    const fs::path cfg = scratch() / "typo.json";
    std::ofstream(cfg) << R"({"image_size": [28, 28], "channels": 1, "patch": 7, "width": 32, "depth": 2, "heads": 2,
      "mlp_dim": 64, "vocab_size": 512, "text_len": 16, "moe_blocks": [1], "exprets": 4})";
    expect_failure("train --config " + cfg.string() + " --steps 1 --out " + (scratch() / "typo").string(),
                   "did you mean \"experts\"", scratch() / "typo" / "checkpoint.safetensors");
  }

  // A truncated checkpoint.
  const fs::path trunc = scratch() / "trunc.safetensors";
  {
    const std::string bytes = slurp(ck);
    std::ofstream(trunc, std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  expect_failure("embed --checkpoint " + trunc.string() + " --input " + in + tail, "safetensors", out);
  // Garbage.
  const fs::path junk = scratch() / "junk.safetensors";
  std::ofstream(junk, std::ios::binary) << "not a checkpoint at all";
  expect_failure("embed --checkpoint " + junk.string() + " --input " + in + tail, "safetensors", out);

  // A missing tensor, a misshaped tensor, an impossible config.
  const fs::path missing = scratch() / "missing.safetensors", misshaped = scratch() / "misshaped.safetensors",
                 badcfg = scratch() / "badcfg.safetensors";
  {
    const auto r = io::SafetensorsReader::open(ck);
    io::SafetensorsWriter w;
    for (const auto& name : r.names())
      if (name != "norm.weight") {
        const auto v = r.read_f32_flat(name);
        w.add(name, r.info(name).shape, std::span<const float>(v));
      }
    for (const auto& [k, v] : r.metadata()) w.set_metadata(k, v);
    w.write(missing.string());
  }
  rewrite(ck, misshaped, [](io::SafetensorsWriter& w, const io::SafetensorsReader&) {
    std::vector<float> v(17, 0.5f);
    w.add("norm.weight", {17}, std::span<const float>(v));
  });
  {
    auto r = io::SafetensorsReader::open(ck);
    auto cfg = nlohmann::json::parse(r.metadata().at("config"));
    cfg["heads"] = 3;  // width 16 is not divisible by 3
    io::SafetensorsWriter w;
    for (const auto& name : r.names()) {
      const auto v = r.read_f32_flat(name);
      w.add(name, r.info(name).shape, std::span<const float>(v));
    }
    for (const auto& [k, v] : r.metadata()) w.set_metadata(k, k == "config" ? cfg.dump() : v);
    w.write(badcfg.string());
  }
  expect_failure("embed --checkpoint " + missing.string() + " --input " + in + tail, "missing tensor \"norm.weight\"", out);
  expect_failure("embed --checkpoint " + misshaped.string() + " --input " + in + tail, "norm.weight", out);
  expect_failure("embed --checkpoint " + badcfg.string() + " --input " + in + tail, "not divisible by heads", out);
  // inspect reads a checkpoint as a model loader does: a missing or misshaped tensor is an error there too.
  expect_failure("inspect " + missing.string(), "missing tensor \"norm.weight\"");
  expect_failure("inspect " + misshaped.string(), "norm.weight");
  CHECK(run("inspect " + ck).code == 0);
  expect_failure("inspect " + (scratch() / "nope.safetensors").string(), "no such checkpoint file");
  // The output may not be the checkpoint; numbers are decimal and in range; an option needs its value.
  expect_failure("embed --checkpoint " + ck + " --input " + in + " --output " + ck, "is the checkpoint itself");
  CHECK(fs::exists(ck));
  expect_failure("embed --checkpoint " + ck + " --input " + in + tail + " --capacity-factor 0x10", "decimal", out);
  expect_failure("embed --checkpoint " + ck + " --input " + in + tail + " --group-size 99999999999999999999",
                 "--group-size must be between 0 and 2147483647, got \"99999999999999999999\"", out);
  expect_failure("embed --checkpoint " + ck + " --input " + in + tail + " --threads 99999999999", "--threads must be between 0 and 4096", out);
  expect_failure("embed --checkpoint " + ck + " --input " + in + " --group-size --output " + out.string(),
                 "--group-size needs a value", out);

  // Inputs of the wrong size, an out-of-range token id, no inputs at all.
  const fs::path wrong = scratch() / "wrong_input.safetensors", badid = scratch() / "bad_ids.safetensors",
                 empty = scratch() / "empty_input.safetensors";
  {
    io::SafetensorsWriter w;
    Tensor<float> img(Shape{2, 9, 8, 1});
    w.add("images", img.cview());
    w.write(wrong.string());
    io::SafetensorsWriter w2;
    Tensor<std::int32_t> ids(Shape{2, 5}, 99);
    w2.add("texts", ids.cview());
    w2.write(badid.string());
    io::SafetensorsWriter w3;
    Tensor<float> other(Shape{2});
    w3.add("something", other.cview());
    w3.write(empty.string());
  }
  expect_failure("embed --checkpoint " + ck + " --input " + wrong.string() + tail, "this model needs [B, 8, 8, 1]", out);
  expect_failure("embed --checkpoint " + ck + " --input " + badid.string() + tail, "token id 99", out);
  expect_failure("embed --checkpoint " + ck + " --input " + empty.string() + tail, "neither", out);
}

TEST_CASE("a checkpoint's header and metadata are the file's: malformed or mismatched parts are refused by name") {
  const std::string ck = kGolden + "tiny_map.ckpt.safetensors", in = kGolden + "tiny_map.io.safetensors";
  const fs::path out = scratch() / "meta.safetensors";
  const std::string tail = " --input " + in + " --output " + out.string();
  const auto cfg = nlohmann::json::parse(io::SafetensorsReader::open(ck).metadata().at("config"));
  {  // a NUL in the header would end the JSON reader's input: what follows it must not go unread
    std::string bytes = slurp(ck);
    std::uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    const std::string header = bytes.substr(8, n) + std::string(1, '\0') + " garbage {{{", data = bytes.substr(8 + n);
    const std::uint64_t m = header.size();
    std::string file(8, '\0');
    std::memcpy(file.data(), &m, 8);
    const fs::path nul = scratch() / "nul.safetensors";
    std::ofstream(nul, std::ios::binary) << file << header << data;
    expect_failure("inspect " + nul.string(), "NUL byte");
    expect_failure("embed --checkpoint " + nul.string() + tail, "NUL byte", out);
  }
  {  // a value nested 100,000 deep in the config: an error naming the key, not a crash printing the value
    auto deep = cfg;
    deep["width"] = "DEEP";
    std::string text = deep.dump();
    text.replace(text.find("\"DEEP\""), 6, std::string(100000, '[') + std::string(100000, ']'));
    const fs::path p = scratch() / "deep.safetensors";
    with_metadata(ck, p, {{"config", text}});
    expect_failure("inspect " + p.string(), "\"width\"");
  }
  {  // a config that does not match its tensors is refused by tensor before the model is allocated (this one would
     // take 200 GB: 64 blocks of width 8192)
    auto big = cfg;
    big["width"] = 8192, big["depth"] = 64, big["heads"] = 8, big["mlp_dim"] = 32768, big["moe_blocks"] = nlohmann::json::array();
    const fs::path p = scratch() / "big.safetensors";
    with_metadata(ck, p, {{"config", big.dump()}});
    expect_failure("embed --checkpoint " + p.string() + tail, "the config requires", out);
    expect_failure("inspect " + p.string(), "the config requires");
  }
  {  // inspect on a path the file system refuses, or a folder, says so
    const fs::path loop = scratch() / "loop.safetensors", dir = scratch() / "dir.safetensors";
    fs::remove(loop);
    fs::create_symlink(loop, loop);
    expect_failure("inspect " + loop.string(), "cannot open checkpoint");
    fs::create_directories(dir);
    expect_failure("inspect " + dir.string(), "is a directory");
    // a run's folder (no preset is named like it): the checkpoint in it is named
    const fs::path run_dir = scratch() / "inspect_run";
    fs::create_directories(run_dir);
    fs::copy_file(ck, run_dir / "checkpoint.safetensors", fs::copy_options::overwrite_existing);
    expect_failure("inspect " + run_dir.string(), "its checkpoint is '" + (run_dir / "checkpoint.safetensors").string() + "'");
  }
}

TEST_CASE("train: a resumed run continues the same loss curve; eval and routing report") {
  const fs::path a = scratch() / "run_a", b = scratch() / "run_b";
  const std::string common = " --preset tiny --data synthetic --batch 16 --lr 3e-3 --warmup 2 --threads 2 --quiet";
  const Run whole = run("train" + common + " --steps 8 --out " + a.string());
  REQUIRE(whole.code == 0);
  REQUIRE(run("train" + common + " --steps 8 --stop-at 4 --out " + b.string()).code == 0);
  // The second leg: steps, batch, lr, seed and data come back from the checkpoint.
  const Run r = run("train --resume " + (b / "checkpoint.safetensors").string() + " --threads 2 --quiet --out " + b.string());
  REQUIRE_MESSAGE(r.code == 0, r.err);
  // The report's smoothed loss goes on across the resume (the checkpoint records it); its train_seconds is the
  // checkpoint's.
  const auto report_a = nlohmann::json::parse(whole.out), report_b = nlohmann::json::parse(r.out);
  CHECK(report_b["final_loss"].get<double>() == report_a["final_loss"].get<double>());
  CHECK(report_b["train_seconds"].get<double>() ==
        nlohmann::json::parse(io::SafetensorsReader::open((b / "checkpoint.safetensors").string()).metadata().at(
            "train_state"))["train_seconds"].get<double>());
  const auto ra = io::SafetensorsReader::open((a / "checkpoint.safetensors").string());
  const auto rb = io::SafetensorsReader::open((b / "checkpoint.safetensors").string());
  for (const auto& name : ra.names()) CHECK_MESSAGE(ra.read_f32_flat(name) == rb.read_f32_flat(name), name);
  // The metrics logs agree line by line on the loss.
  auto losses = [](const fs::path& p) {
    std::vector<double> v;
    std::ifstream f(p / "metrics.jsonl");
    for (std::string line; std::getline(f, line);) v.push_back(nlohmann::json::parse(line)["loss"].get<double>());
    return v;
  };
  CHECK(losses(a) == losses(b));
  CHECK(losses(a).size() == 8);
  {  // resumed into another folder: its log starts with the resumed checkpoint's folder's steps
    const fs::path e = scratch() / "run_e", f = scratch() / "run_f";
    REQUIRE(run("train" + common + " --steps 8 --stop-at 4 --out " + e.string()).code == 0);
    REQUIRE(run("train --resume " + (e / "checkpoint.safetensors").string() + " --threads 2 --quiet --out " + f.string()).code == 0);
    CHECK(losses(f) == losses(a));
    CHECK(losses(e).size() == 4);
    // A run resumed into another folder starts its .partial with the earlier steps: one that fails (or is killed)
    // before its first log rename leaves them beside its own steps, not only in the folder it came from.
    const fs::path fail = scratch() / "run_e_fail";
    const Run diverged = run("train --resume " + (e / "checkpoint.safetensors").string() + " --lr 1e12 --threads 2 --quiet --out " + fail.string());
    CHECK(diverged.code == 2);
    CHECK_FALSE(fs::exists(fail / "metrics.jsonl"));
    CHECK(slurp(fail / "metrics.jsonl.partial").substr(0, slurp(e / "metrics.jsonl").size()) == slurp(e / "metrics.jsonl"));
    // Such a .partial, holding steps 1 to the checkpoint's by itself, is the log of the checkpoint beside it: a
    // run killed after that checkpoint and before its log rename, with no log beside it or an older run's, is
    // resumed with every step once.
    const fs::path m = scratch() / "run_m";
    REQUIRE(run("train --resume " + (e / "checkpoint.safetensors").string() + " --stop-at 6 --threads 2 --quiet --out " + m.string()).code == 0);
    REQUIRE(losses(m).size() == 6);
    // An older run of another seed, 8 steps: its log is no part of this one's.
    const fs::path other = scratch() / "run_other";
    REQUIRE(run("train" + common + " --steps 8 --seed 5 --out " + other.string()).code == 0);
    REQUIRE(losses(other).size() == 8);
    REQUIRE(losses(other) != losses(a));
    const std::string m_log = slurp(m / "metrics.jsonl"), other_log = slurp(other / "metrics.jsonl");
    // The log beside the checkpoint: none; an older run's shorter than the checkpoint's step; one that goes past
    // it; one ending in a line that is no step's record. Each time the .partial is the whole log.
    for (const std::string& older : {std::string("-"), slurp(e / "metrics.jsonl"), other_log, other_log + "a note\n"}) {
      const fs::path mk = scratch() / "run_mk";
      fs::remove_all(mk);
      fs::create_directories(mk);
      fs::copy_file(m / "checkpoint.safetensors", mk / "checkpoint.safetensors");
      std::ofstream(mk / "metrics.jsonl.partial") << m_log;
      if (older != "-") std::ofstream(mk / "metrics.jsonl") << older;
      const Run rk = run("train --resume " + (mk / "checkpoint.safetensors").string() + " --threads 2 --quiet --out " + mk.string());
      REQUIRE_MESSAGE(rk.code == 0, rk.err);
      CHECK(losses(mk) == losses(a));
      CHECK_FALSE(fs::exists(mk / "metrics.jsonl.partial"));
    }
    {  // A .partial of another run (a later run in the folder that failed) holding steps 1 on: its lines do not
       // give the checkpoint's smoothed loss, so they are not taken for its log; the log beside it stays.
      const fs::path mk = scratch() / "run_mk";
      fs::remove_all(mk);
      fs::create_directories(mk);
      fs::copy_file(m / "checkpoint.safetensors", mk / "checkpoint.safetensors");
      std::ofstream(mk / "metrics.jsonl.partial") << other_log;
      const std::string two = m_log.substr(0, m_log.find('\n', m_log.find('\n') + 1) + 1);  // steps 1-2
      std::ofstream(mk / "metrics.jsonl") << two;
      const Run rk = run("train --resume " + (mk / "checkpoint.safetensors").string() + " --threads 2 --quiet --out " + mk.string());
      REQUIRE_MESSAGE(rk.code == 0, rk.err);
      const auto got = losses(mk), want = losses(a);
      REQUIRE(got.size() == 4);  // steps 1-2 of the log beside it, then this run's 7-8
      CHECK(std::vector<double>(got.begin(), got.begin() + 2) == std::vector<double>(want.begin(), want.begin() + 2));
      CHECK(std::vector<double>(got.begin() + 2, got.end()) == std::vector<double>(want.begin() + 6, want.end()));
    }
    // a leg that cannot run (--stop-at not after the checkpoint's step) is refused before touching its folder
    fs::copy_file(e / "metrics.jsonl", e / "metrics.jsonl.partial");
    expect_failure("train --resume " + (e / "checkpoint.safetensors").string() + " --stop-at 3 --out " + e.string(),
                   "--stop-at 3 is not after the current step 4");
    CHECK(slurp(e / "metrics.jsonl.partial") == slurp(e / "metrics.jsonl"));
    // a checkpoint without its tokenizer (as another program may write one) cannot go on training on captions
    const fs::path no_tok = scratch() / "no_tokenizer.safetensors";
    {
      const auto r = io::SafetensorsReader::open((e / "checkpoint.safetensors").string());
      REQUIRE(r.metadata().count("tokenizer") == 1);
      io::SafetensorsWriter w;
      for (const auto& name : r.names()) {
        const auto v = r.read_f32_flat(name);
        w.add(name, r.info(name).shape, std::span<const float>(v));
      }
      for (const auto& [k, v] : r.metadata())
        if (k != "tokenizer") w.set_metadata(k, v);
      w.write(no_tok.string());
    }
    expect_failure("train --resume " + no_tok.string() + " --out " + (scratch() / "run_no_tok").string(),
                   "has no \"tokenizer\" in its metadata, so training cannot go on from it");
    CHECK_FALSE(fs::exists(scratch() / "run_no_tok" / "checkpoint.safetensors"));
  }
  {  // a run killed after writing its checkpoint (step 4) but before renaming its log: the log holds steps 1-2, the
     // .partial beside it steps 3-4, a step 5 the run went on to and a line cut short. Resumed in the same folder
     // or into another, the log gets steps 3-4 back, once, and nothing after the checkpoint.
    const fs::path k = scratch() / "run_k";
    REQUIRE(run("train" + common + " --steps 8 --stop-at 4 --out " + k.string()).code == 0);
    std::vector<std::string> lines;
    {
      std::ifstream f(k / "metrics.jsonl");
      for (std::string line; std::getline(f, line);) lines.push_back(line);
    }
    REQUIRE(lines.size() == 4);
    auto kill = [&] {
      std::ofstream(k / "metrics.jsonl", std::ios::trunc) << lines[0] << "\n" << lines[1] << "\n";
      auto step5 = nlohmann::json::parse(lines[3]);
      step5["step"] = 5;
      std::ofstream(k / "metrics.jsonl.partial", std::ios::trunc)
          << lines[2] << "\n" << lines[3] << "\n" << step5.dump() << "\n" << lines[3].substr(0, lines[3].size() / 2);
    };
    const fs::path other = scratch() / "run_k2";
    kill();
    REQUIRE(run("train --resume " + (k / "checkpoint.safetensors").string() + " --threads 2 --quiet --out " + other.string()).code == 0);
    CHECK(losses(other) == losses(a));
    // A new run's first checkpoint beside an older run's log (killed before its log replaced the old one): its
    // .partial starts at step 1, not after the old log's last step, so nothing of it is mixed into that log.
    kill();
    std::ofstream(k / "metrics.jsonl.partial", std::ios::trunc) << lines[0] << "\n" << lines[1] << "\n" << lines[2] << "\n";
    const std::string old_log = slurp(k / "metrics.jsonl");
    const fs::path k3 = scratch() / "run_k3";
    REQUIRE(run("train --resume " + (k / "checkpoint.safetensors").string() + " --threads 2 --quiet --stop-at 5 --out " + k3.string()).code == 0);
    CHECK(slurp(k3 / "metrics.jsonl").substr(0, old_log.size()) == old_log);
    CHECK(losses(k3).size() == 3);  // the old log's 2 lines and step 5; no line of the .partial
    kill();
    REQUIRE(run("train --resume " + (k / "checkpoint.safetensors").string() + " --threads 2 --quiet --out " + k.string()).code == 0);
    CHECK(losses(k) == losses(a));
    CHECK_FALSE(fs::exists(k / "metrics.jsonl.partial"));
  }
  {  // a log beside the checkpoint that goes past its step (copied from a later point of the run): the resumed
     // run's log keeps its steps up to the checkpoint's, then its own, each step once
    const fs::path h = scratch() / "run_h", h2 = scratch() / "run_h2";
    REQUIRE(run("train" + common + " --steps 8 --stop-at 4 --out " + h.string()).code == 0);
    fs::copy_file(a / "metrics.jsonl", h / "metrics.jsonl", fs::copy_options::overwrite_existing);
    REQUIRE(run("train --resume " + (h / "checkpoint.safetensors").string() + " --threads 2 --quiet --out " + h2.string()).code == 0);
    CHECK(losses(h2) == losses(a));
  }

  const Run e = run("eval --checkpoint " + (a / "checkpoint.safetensors").string() + " --max-test 64 --retrieval 32");
  REQUIRE_MESSAGE(e.code == 0, e.err);
  const auto j = nlohmann::json::parse(e.out);
  for (const char* key : {"zero_shot_top1", "linear_probe_10shot", "recall_at_1_i2t", "recall_at_1_t2i", "drop_rate_img",
                          "drop_rate_txt", "train_seconds", "params_total", "params_per_token"})
    CHECK_MESSAGE(j.contains(key), key);
  CHECK(j["data"].get<std::string>().find("synthetic") != std::string::npos);  // the data the model was trained on
  const fs::path rep = scratch() / "routing";
  const Run g = run("routing --checkpoint " + (a / "checkpoint.safetensors").string() + " --pairs 64 --out " + rep.string());
  REQUIRE_MESSAGE(g.code == 0, g.err);
  CHECK_MESSAGE(g.out.find("capacity factor 1.05 ") != std::string::npos, g.out);  // the factor it routed at
  CHECK(fs::exists(rep.string() + ".svg"));
  CHECK(fs::exists(rep.string() + ".json"));
  for (int pairs : {100, 130}) {  // exactly --pairs pairs, in groups of at most 128: 16 image tokens a tiny pair
    REQUIRE(run("routing --checkpoint " + (a / "checkpoint.safetensors").string() + " --pairs " +
                std::to_string(pairs) + " --images 0 --out " + rep.string()).code == 0);
    const auto blocks = nlohmann::json::parse(slurp(rep.string() + ".json"));
    REQUIRE(blocks.size() == 1);
    CHECK(blocks[0]["img"]["tokens"].get<long long>() == pairs * 16);
  }
  expect_failure("routing --checkpoint " + (a / "checkpoint.safetensors").string() + " --pairs 0 --out " + rep.string(),
                 "--pairs must be at least 1");
  {  // a folder where the picture goes: the report beside it is not replaced either (both files or neither)
    const fs::path rep2 = scratch() / "routing2";
    fs::create_directories(rep2.string() + ".svg");
    std::ofstream(rep2.string() + ".json") << "OLD";
    expect_failure("routing --checkpoint " + (a / "checkpoint.safetensors").string() + " --pairs 8 --out " + rep2.string(),
                   "routing2.svg': it is a directory");
    CHECK(slurp(rep2.string() + ".json") == "OLD");
  }
  expect_failure("train" + common + " --steps -1 --out " + (scratch() / "c").string(), "--steps must be between 1");
  expect_failure("train" + common + " --steps 4 --stop-at 5 --out " + (scratch() / "c").string(), "--stop-at must be between 1 and 4");
  expect_failure("train" + common + " --clip -1 --out " + (scratch() / "c").string(), "--clip must be at least 0");
  // The tokenizer pads captions with id 0: a model told another pad_id would take a word for padding.
  expect_failure("train" + common + " --set pad_id=3 --out " + (scratch() / "c").string(),
                 "the model's pad_id 3 is not the id the tokenizer pads captions with (0, <pad>)");
  CHECK_FALSE(fs::exists(scratch() / "c" / "checkpoint.safetensors"));
  // A loss that overflows before any update names the config, not the learning rate.
  {  // (after the run's first line: training had started)
    const Run d = run("train" + common + " --steps 2 --set 'aux_loss={\"z_loss\":1e308}' --out " +
                      (scratch() / "c").string());
    CHECK(d.code == 2);
    CHECK_MESSAGE(d.err.find("training diverged at step 0 (loss inf); the initial model's loss is not finite, before "
                             "any update") != std::string::npos, d.err);
    CHECK_FALSE(fs::exists(scratch() / "c" / "checkpoint.safetensors"));
  }
  expect_failure("train" + common + " --out \"\"", "--out needs a folder name");
  expect_failure("train --resume " + (a / "checkpoint.safetensors").string() + " --preset tiny --out " + a.string(),
                 "--preset would be ignored");
  expect_failure("train --resume " + (a / "checkpoint.safetensors").string() + " --dense --out " + a.string(),
                 "--dense would change it");
  expect_failure("train --preset tiny --config x.json --out " + (scratch() / "c").string(), "not both");
  // --set of an object that gives a key twice; eval on a single example (every metric trivially perfect)
  expect_failure("train --preset tiny --data synthetic --steps 1 --set 'router={\"bpr\":true,\"bpr\":false}' --out " +
                     (scratch() / "c").string(),
                 "\"bpr\" appears twice");
  expect_failure("eval --checkpoint " + (a / "checkpoint.safetensors").string() + " --max-test 1", "--max-test");
  {  // one process: routing groups of pairs need not tile the batch (the last group is shorter); --lr 0 trains
     // nothing
    const fs::path g1 = scratch() / "run_g1", g3 = scratch() / "run_g3";
    const std::string flags = "train --preset tiny --data synthetic --batch 7 --lr 0 --set group_pairs=3 --quiet --threads 1";
    for (const auto& [steps, dir] : {std::pair{1, g1}, std::pair{3, g3}}) {
      const Run r = run(flags + " --steps " + std::to_string(steps) + " --out " + dir.string());
      REQUIRE_MESSAGE(r.code == 0, r.err);
    }
    const auto r1 = io::SafetensorsReader::open((g1 / "checkpoint.safetensors").string());
    const auto r3 = io::SafetensorsReader::open((g3 / "checkpoint.safetensors").string());
    for (const auto& name : r1.names())
      if (name.rfind("opt.", 0) != 0) CHECK_MESSAGE(r1.read_f32_flat(name) == r3.read_f32_flat(name), name);
  }
  {  // a checkpoint's training state and tokenizer are the file's: checked by name before they are used
    const fs::path src = a / "checkpoint.safetensors", p = scratch() / "state.safetensors";
    const auto md = io::SafetensorsReader::open(src.string()).metadata();
    auto state = nlohmann::json::parse(md.at("train_state"));
    const std::string resume = "train --resume " + p.string() + " --quiet --out " + (scratch() / "r").string();
    for (const auto& [key, value] : std::vector<std::pair<std::string, nlohmann::json>>{
             {"steps", "x"}, {"batch", 8.5}, {"steps", 1e30}, {"lr", "fast"}, {"train_seconds", nlohmann::json::array()},
             {"data", 5}, {"data", nullptr}, {"data_path", false}}) {
      auto bad = state;
      bad[key] = value;
      with_metadata(src, p, {{"train_state", bad.dump()}});
      expect_failure(resume, "train_state \"" + key + "\" must be");
      // the recorded data is the file's too where eval reads it (a number there once picked other data)
      if (key.rfind("data", 0) == 0) expect_failure("eval --checkpoint " + p.string() + " --max-test 32", "train_state \"" + key + "\" must be a string");
    }
    {  // any seed --seed accepts resumes (up to 2^63 - 1)
      const fs::path s1 = scratch() / "run_seed";
      REQUIRE(run("train --preset tiny --data synthetic --batch 16 --steps 2 --stop-at 1 --seed 9223372036854775807 --quiet --out " + s1.string()).code == 0);
      const Run r2 = run("train --resume " + (s1 / "checkpoint.safetensors").string() + " --quiet --out " + s1.string());
      CHECK_MESSAGE(r2.code == 0, r2.err);
    }
    {  // the recorded step must be the optimizer's; a train_state without a seed needs --seed
      auto edited = state;
      edited["step"] = edited["step"].get<std::int64_t>() + 95;
      with_metadata(src, p, {{"train_state", edited.dump()}});
      expect_failure(resume, "differs from its optimizer's step");
      edited = state;
      edited.erase("seed");
      with_metadata(src, p, {{"train_state", edited.dump()}});
      expect_failure(resume, "records no \"seed\"");
    }
    auto bad = state;
    bad["steps"] = -5;  // a recorded setting passes the flag's range check too
    with_metadata(src, p, {{"train_state", bad.dump()}});
    expect_failure(resume, "--steps must be between 1");
    // a train_state that cannot be read back is refused, not replaced by defaults: not JSON, not an object, or
    // an object with a NUL after it (the JSON reader would stop there and read the part before)
    for (const std::string& text : {std::string("{\"steps\": 8"), std::string("[1, 2]"), state.dump() + '\0' + "junk"}) {
      with_metadata(src, p, {{"train_state", text}});
      expect_failure(resume, text.find('\0') != std::string::npos ? "its train_state holds a NUL byte"
                                                                 : "its train_state is not a JSON object");
    }
    // eval reports train_seconds only as a number, never the file's value as it is
    bad = state;
    bad["train_seconds"] = "abc";
    with_metadata(src, p, {{"train_state", bad.dump()}});
    const Run e2 = run("eval --checkpoint " + p.string() + " --max-test 32 --retrieval 16");
    REQUIRE_MESSAGE(e2.code == 0, e2.err);
    CHECK_FALSE(nlohmann::json::parse(e2.out).contains("train_seconds"));
    // optimizer moments that would turn the weights into NaN at the next step
    for (const auto& [name, v] : std::vector<std::pair<std::string, float>>{{"opt.m", std::nanf("")}, {"opt.v", -1.0f}}) {
      rewrite(src, p, [&, name = name, v = v](io::SafetensorsWriter& w, const io::SafetensorsReader& r) {
        auto t = r.read_f32_flat(name);
        t[0] = v;
        w.add(name, r.info(name).shape, std::span<const float>(t));
      });
      expect_failure(resume, name + " holds");
    }
    // a tokenizer that does not fit the model's text_len
    auto tok = nlohmann::json::parse(md.at("tokenizer"));
    tok["text_len"] = tok["text_len"].get<int>() + 1;
    with_metadata(src, p, {{"tokenizer", tok.dump()}});
    expect_failure("eval --checkpoint " + p.string() + " --max-test 32", "tokenizer's text_len");
    tok["text_len"] = std::int64_t{1} << 40;
    with_metadata(src, p, {{"tokenizer", tok.dump()}});
    expect_failure("eval --checkpoint " + p.string() + " --max-test 32", "text_len");
  }
  {  // a failed run leaves the folder's checkpoint and metrics.jsonl as they were; its own lines go to .partial
    const fs::path d = scratch() / "run_d";
    REQUIRE(run("train" + common + " --steps 3 --out " + d.string()).code == 0);
    CHECK_FALSE(fs::exists(d / "metrics.jsonl.partial"));
    const std::string before = slurp(d / "metrics.jsonl"), ck_before = slurp(d / "checkpoint.safetensors");
    CHECK(std::count(before.begin(), before.end(), '\n') == 3);
    const Run bad = run("train" + common + " --steps 5 --lr 1e12 --out " + d.string());
    CHECK(bad.code == 2);
    CHECK(slurp(d / "metrics.jsonl") == before);
    CHECK(slurp(d / "checkpoint.safetensors") == ck_before);
    CHECK(fs::exists(d / "metrics.jsonl.partial"));
    // A folder where the run's log would go: refused before training, the checkpoint beside it untouched and no
    // staged log left behind (before, the run trained, replaced the checkpoint, then failed on the log).
    const fs::path d2 = scratch() / "run_d2";
    fs::create_directories(d2 / "metrics.jsonl");
    fs::copy_file(d / "checkpoint.safetensors", d2 / "checkpoint.safetensors");
    expect_failure("train" + common + " --steps 2 --out " + d2.string(), "metrics.jsonl': it is a directory, not a file");
    CHECK(slurp(d2 / "checkpoint.safetensors") == ck_before);
    {  // The checkpoint's write failing after the log was staged: the staged log goes, no log replaces the folder's,
       // and the run's steps stay in the .partial. A folder whose path is so long that the checkpoint's name fits
       // within PATH_MAX but its temporary file's does not, while the log's temporary name still fits.
      fs::path deep = scratch();
      const std::size_t want = 4070;  // + "/checkpoint.safetensors" = 4093 <= 4095; its ".tmp.<pid>.<n>" does not fit
      while (deep.string().size() + 201 < want) deep /= std::string(200, 'd');
      deep /= std::string(want - deep.string().size() - 1, 'e');
      REQUIRE(deep.string().size() == want);
      fs::create_directories(deep);
      const Run r = run("train" + common + " --steps 2 --out " + deep.string());
      CHECK(r.code == 2);
      CHECK_MESSAGE(r.err.find("cannot create the temporary file") != std::string::npos, r.err);
      CHECK_FALSE(fs::exists(deep / "metrics.jsonl.tmp"));
      CHECK_FALSE(fs::exists(deep / "metrics.jsonl"));
      const std::string steps = slurp(deep / "metrics.jsonl.partial");
      CHECK(std::count(steps.begin(), steps.end(), '\n') == 2);
      fs::remove_all(scratch() / std::string(200, 'd'));
    }
    // a pipe where the .partial goes would hold the run at its first line: refused the same way
    fs::remove(d2 / "metrics.jsonl");
    REQUIRE(::mkfifo((d2 / "metrics.jsonl.partial").c_str(), 0600) == 0);
    expect_failure("train" + common + " --steps 2 --out " + d2.string(), "metrics.jsonl.partial': it is not a regular file");
    CHECK(slurp(d2 / "checkpoint.safetensors") == ck_before);
    // A new run in the same folder replaces the log with its own steps (at its first checkpoint).
    REQUIRE(run("train" + common + " --steps 2 --out " + d.string()).code == 0);
    const std::string after = slurp(d / "metrics.jsonl");
    CHECK(std::count(after.begin(), after.end(), '\n') == 2);
    CHECK_FALSE(fs::exists(d / "metrics.jsonl.partial"));
  }
  {  // --set vocab_size is kept (a preset's vocab_size otherwise follows the tokenizer)
    const fs::path v = scratch() / "run_v";
    REQUIRE(run("train" + common + " --steps 2 --set vocab_size=1000 --out " + v.string()).code == 0);
    const auto cfg = read_checkpoint_config((v / "checkpoint.safetensors").string());
    CHECK(cfg.vocab_size == 1000);
  }
  expect_failure("train --preset tiny --data synthetic --batch 1 --steps 2 --out " + (scratch() / "c").string(), "--batch must be at least 2");
  // Precision is a run-time choice: a bf16 leg resumes the fp32 run's checkpoint, and its checkpoint (fp32 master
  // weights, the same file layout) evaluates under either precision with nearly the same numbers.
  const fs::path c = scratch() / "run_c";
  REQUIRE(run("train" + common + " --steps 8 --stop-at 4 --out " + c.string()).code == 0);
  const Run r16 = run("train --resume " + (c / "checkpoint.safetensors").string() +
                      " --threads 2 --quiet --precision bf16 --out " + c.string());
  REQUIRE_MESSAGE(r16.code == 0, r16.err);
  const auto rc = io::SafetensorsReader::open((c / "checkpoint.safetensors").string());
  CHECK(nlohmann::json::parse(rc.metadata().at("train_state"))["precision"] == "bf16");
  double max_param_diff = 0;
  for (const auto& name : ra.names()) {
    const auto x = ra.read_f32_flat(name), y = rc.read_f32_flat(name);
    for (std::size_t i = 0; i < x.size(); ++i) max_param_diff = std::max(max_param_diff, std::abs(double(x[i]) - y[i]));
  }
  CHECK(max_param_diff > 0);     // the last four steps ran in bf16
  CHECK(max_param_diff < 0.05);  // and stayed near the fp32 run (lr 3e-3, 4 Adam steps: at most ~0.012 per step)
  const auto losses_c = losses(c);
  REQUIRE(losses_c.size() == 8);
  for (std::size_t i = 0; i < 4; ++i) CHECK(losses_c[i] == losses(a)[i]);
  for (std::size_t i = 4; i < 8; ++i) CHECK(std::abs(losses_c[i] - losses(a)[i]) < 0.02 * losses(a)[i]);
  for (const char* prec : {"fp32", "bf16"}) {
    const Run ec = run("eval --checkpoint " + (c / "checkpoint.safetensors").string() +
                       " --max-test 64 --retrieval 32 --precision " + prec);
    REQUIRE_MESSAGE(ec.code == 0, ec.err);
    CHECK(nlohmann::json::parse(ec.out)["precision"] == prec);
  }
  fs::remove_all(scratch());
}

TEST_CASE("two towers and --set; scripts/experiment trains arms x seeds, resumes, and limoe report summarises them") {
  fs::create_directories(scratch());
  const fs::path proto = scratch() / "proto.txt", dir = scratch() / "exp";
  {
    std::ofstream f(proto);
    f << "title Smoke test\n# a comment\nseeds 0 1\n"
      << "train --preset tiny --data synthetic --steps 3 --batch 8\n"
      << "eval --max-test 64 --retrieval 32\n"
      << "baseline moe\narm moe\narm two --two-tower\narm nobpr --set router.bpr=false --set aux_loss.load=0.5\n";
  }
  const std::string experiment = "LIMOE_BIN=" + kCli + " bash " + std::string(LIMOE_SCRIPTS_DIR) + "/experiment ";
  auto sh = [&](const std::string& args) {
    const std::string cmd = experiment + args + " > " + (scratch() / "exp.out").string() + " 2>&1";
    const int status = std::system(cmd.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  REQUIRE_MESSAGE(sh(proto.string() + " --out " + dir.string() + " --threads 1 --jobs 2") == 0, slurp(scratch() / "exp.out"));
  std::map<std::string, std::vector<double>> zero_shot;
  for (const char* arm : {"moe", "two", "nobpr"})
    for (int seed : {0, 1}) {
      const fs::path run_dir = dir / arm / ("seed" + std::to_string(seed));
      REQUIRE_MESSAGE(fs::exists(run_dir / "eval.json"), run_dir);
      const auto j = nlohmann::json::parse(slurp(run_dir / "eval.json"));
      for (const char* key : {"recall_at_1_i2t_unique", "recall_at_1_t2i_unique", "unique_captions", "heldout_contrastive_loss"})
        CHECK_MESSAGE(j.contains(key), key);
      CHECK(j["heldout_contrastive_loss"].get<double>() > 0);
      zero_shot[arm].push_back(j["zero_shot_top1"].get<double>());
      const auto cfg = read_checkpoint_config((run_dir / "checkpoint.safetensors").string());
      const auto names = io::SafetensorsReader::open((run_dir / "checkpoint.safetensors").string()).names();
      const bool has_txt_tower = std::find(names.begin(), names.end(), "txt.blocks.0.attn.q.weight") != names.end();
      if (std::string(arm) == "two") {
        CHECK(cfg.towers == 2);
        CHECK(cfg.moe_blocks.empty());
        CHECK(has_txt_tower);
        CHECK_FALSE(j.contains("routing"));
      } else {
        CHECK(cfg.towers == 1);
        CHECK_FALSE(has_txt_tower);
        REQUIRE(j.contains("routing"));
        CHECK(j["routing"].size() == cfg.moe_blocks.size());
        CHECK(j["routing"][0]["txt"].contains("effective_experts"));
        CHECK(j.contains("text_effective_experts"));
      }
      CHECK(cfg.router.bpr == (std::string(arm) != "nobpr"));
      if (std::string(arm) == "nobpr") CHECK(cfg.aux.load_weight == 0.5);
      CHECK(slurp(run_dir / "command.txt").find("--seed " + std::to_string(seed)) != std::string::npos);
    }
  // The report: the mean over seeds and the paired difference against the baseline, from the runs' own files.
  const auto rep = nlohmann::json::parse(slurp(dir / "report.json"));
  CHECK(rep["baseline"] == "moe");
  REQUIRE(rep["arms"].size() == 3);
  CHECK(rep["arms"][1]["arm"] == "two");
  CHECK(rep["arms"][1]["zero_shot_top1"]["mean"].get<double>() == doctest::Approx((zero_shot["two"][0] + zero_shot["two"][1]) / 2));
  const auto& diff = rep["paired_differences"][0];
  CHECK(diff["arm"] == "two");
  const double d0 = zero_shot["two"][0] - zero_shot["moe"][0], d1 = zero_shot["two"][1] - zero_shot["moe"][1];
  CHECK(diff["zero_shot_top1"]["mean"].get<double>() == doctest::Approx((d0 + d1) / 2));
  const double half = 12.706 * std::abs(d0 - d1) / std::sqrt(2.0) / std::sqrt(2.0);  // t(1) * sd / sqrt(2)
  CHECK(diff["zero_shot_top1"]["hi"].get<double>() == doctest::Approx((d0 + d1) / 2 + half));
  const std::string md = slurp(dir / "report.md");
  CHECK(md.find("# Smoke test") != std::string::npos);
  CHECK(md.find("| two | 2 |") != std::string::npos);
  CHECK(md.find("Routing per MoE block") != std::string::npos);
  CHECK(md.find("--two-tower") != std::string::npos);  // each arm's command
  for (const char* pic : {"accuracy.svg", "routing.svg"}) CHECK_MESSAGE(slurp(dir / pic).rfind("<svg", 0) == 0, pic);
  // Rerun: every run has its eval.json, so nothing trains again.
  const auto stamp = fs::last_write_time(dir / "moe" / "seed0" / "checkpoint.safetensors");
  REQUIRE(sh(proto.string() + " --out " + dir.string()) == 0);
  CHECK(fs::last_write_time(dir / "moe" / "seed0" / "checkpoint.safetensors") == stamp);
  // Bad input: one line naming the problem, exit 2.
  expect_failure("report " + (scratch() / "nope").string(), "is not a folder");
  expect_failure("report " + dir.string() + " --baseline nope", "baseline arm \"nope\"");
  expect_failure("train --preset tiny --set widht=3 --steps 1 --out " + (scratch() / "w").string(), "did you mean \"width\"");
  expect_failure("train --preset tiny --set towers=2 --steps 1 --out " + (scratch() / "w").string(), "dense blocks only");
  {
    std::ofstream f(proto);
    f << "arm a\nstepz 3\n";
  }
  CHECK(sh(proto.string() + " --out " + dir.string()) == 2);
  CHECK(slurp(scratch() / "exp.out").find("unknown line 'stepz'") != std::string::npos);
  fs::remove_all(scratch());
}

TEST_CASE("fashion-scenes: train with its default preset, eval reports compositional zero-shot") {
  if (!data::fashion_mnist_available()) LIMOE_SKIP("Fashion-MNIST is not installed (Debian: dataset-fashion-mnist)");
  fs::create_directories(scratch());
  const fs::path out = scratch() / "scenes";
  Run r = run("train --data fashion-scenes --steps 2 --batch 8 --threads 2 --quiet --out " + out.string());
  REQUIRE_MESSAGE(r.code == 0, r.err);
  const auto cfg = read_checkpoint_config((out / "checkpoint.safetensors").string());
  CHECK((cfg.image_size[0] == 56 && cfg.image_size[1] == 56 && cfg.channels == 3));  // small-56 by default
  r = run("eval --checkpoint " + (out / "checkpoint.safetensors").string() + " --max-test 300 --retrieval 50 --shots 1");
  REQUIRE_MESSAGE(r.code == 0, r.err);
  const auto j = nlohmann::json::parse(r.out);
  CHECK(j["data"] == "fashion-scenes/test");
  for (const char* key : {"zero_shot_top1", "compositional_zero_shot", "seen_combination_zero_shot"}) CHECK_MESSAGE(j.contains(key), key);
  CHECK(j["compositional_zero_shot_scenes"].get<int>() > 0);
  CHECK(j["seen_combination_zero_shot_scenes"].get<int>() > j["compositional_zero_shot_scenes"].get<int>());
  // A 28x28x1 model cannot take the scenes: one line naming the preset to use.
  expect_failure("train --data fashion-scenes --preset tiny --steps 1 --batch 8 --out " + (scratch() / "bad").string(),
                 "use the small-56 preset");
  fs::remove_all(scratch());
}

#if defined(LIMOE_MPIRUN)
// Data parallel through the command line: `mpirun -np 2 limoe train` follows one process's loss curve on the same
// whole batch (routing groups of 4 pairs tile both layouts), writes from rank 0 only, resumes on another rank
// count, and a bad layout ends every rank with one message instead of a hang.
TEST_CASE("train under mpirun: 2 ranks follow one process; resume across rank counts; layout errors") {
  fs::create_directories(scratch());  // an earlier case removes it when it ends
  ::setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
  ::setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
  const std::string mpirun = std::string(LIMOE_MPIRUN) + " --oversubscribe -np 2 ";
  auto cfg = to_json(preset("tiny"));
  cfg["group_pairs"] = 4;
  cfg["router"]["capacity_factor_train"] = 1.0;
  const fs::path cfg_path = scratch() / "dp_config.json";
  std::ofstream(cfg_path) << cfg.dump();
  const std::string common = " --config " + cfg_path.string() + " --data synthetic --batch 8 --lr 3e-3 --warmup 2 --steps 6 --threads 1 --quiet";
  const fs::path one = scratch() / "dp_one", two = scratch() / "dp_two", mixed = scratch() / "dp_mixed";
  Run r = run("train" + common + " --out " + one.string());
  REQUIRE_MESSAGE(r.code == 0, r.err);
  const std::string cmd2 = mpirun + kCli + " train" + common + " --data-parallel 2 --out " + two.string() + " > " +
                           (scratch() / "dp.out").string() + " 2> " + (scratch() / "dp.err").string();
  REQUIRE_MESSAGE(std::system(cmd2.c_str()) == 0, slurp(scratch() / "dp.err"));
  const std::string dp_out = slurp(scratch() / "dp.out");
  CHECK(std::count(dp_out.begin(), dp_out.end(), '\n') == 1);  // rank 0's line only
  // Two legs: steps 1-3 on 2 ranks, 4-6 on one process from the checkpoint.
  const std::string leg1 = mpirun + kCli + " train" + common + " --stop-at 3 --out " + mixed.string() + " 2> " +
                           (scratch() / "dp.err").string();
  REQUIRE_MESSAGE(std::system(leg1.c_str()) == 0, slurp(scratch() / "dp.err"));
  r = run("train --resume " + (mixed / "checkpoint.safetensors").string() + " --threads 1 --quiet --out " + mixed.string());
  REQUIRE_MESSAGE(r.code == 0, r.err);
  auto log = [](const fs::path& p) {
    std::vector<nlohmann::json> v;
    std::ifstream f(p / "metrics.jsonl");
    for (std::string line; std::getline(f, line);) v.push_back(nlohmann::json::parse(line));
    return v;
  };
  const auto l1 = log(one), l2 = log(two), lm = log(mixed);
  REQUIRE(l1.size() == 6);
  REQUIRE(l2.size() == 6);
  REQUIRE(lm.size() == 6);
  for (std::size_t s = 0; s < 6; ++s) {
    CAPTURE(s);
    const double want = l1[s]["loss"].get<double>();
    CHECK(std::abs(l2[s]["loss"].get<double>() - want) < 1e-4 * std::abs(want));
    CHECK(std::abs(lm[s]["loss"].get<double>() - want) < 1e-4 * std::abs(want));
    // Routing statistics are the whole batch's on every layout.
    CHECK(l2[s]["moe"][0]["img"]["tokens"] == l1[s]["moe"][0]["img"]["tokens"]);
    CHECK(l2[s]["moe"][0]["txt"]["dropped"] == l1[s]["moe"][0]["txt"]["dropped"]);
  }
  const auto ra = io::SafetensorsReader::open((one / "checkpoint.safetensors").string());
  const auto rb = io::SafetensorsReader::open((two / "checkpoint.safetensors").string());
  double worst = 0;
  for (const auto& name : ra.names()) {
    if (name.rfind("opt.", 0) == 0 || name.find(".k.bias") != std::string::npos) continue;  // k.bias: zero gradient
    const auto a = ra.read_f32_flat(name), b = rb.read_f32_flat(name);
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, static_cast<double>(std::abs(a[i] - b[i])));
  }
  CHECK(worst < 1e-4);  // 6 AdamW steps of lr 3e-3 from the same start; float sums in another order
  // Expert parallel: the 4 experts of each MoE block shared out over the 2 ranks; the checkpoint holds the whole
  // model (rank 0 gathers the parts) and follows one process as well.
  const fs::path experts = scratch() / "dp_experts";
  const std::string cmd_ep = mpirun + kCli + " train" + common + " --expert-parallel 2 --data-parallel 1 --out " +
                             experts.string() + " 2> " + (scratch() / "dp.err").string();
  REQUIRE_MESSAGE(std::system(cmd_ep.c_str()) == 0, slurp(scratch() / "dp.err"));
  const auto le = log(experts);
  REQUIRE(le.size() == 6);
  for (std::size_t s = 0; s < 6; ++s)
    CHECK(std::abs(le[s]["loss"].get<double>() - l1[s]["loss"].get<double>()) < 1e-4 * std::abs(l1[s]["loss"].get<double>()));
  const auto rc = io::SafetensorsReader::open((experts / "checkpoint.safetensors").string());
  double worst_ep = 0;
  for (const auto& name : ra.names()) {
    if (name.find(".k.bias") != std::string::npos) continue;
    const auto a = ra.read_f32_flat(name), c = rc.read_f32_flat(name);
    REQUIRE(a.size() == c.size());
    for (std::size_t i = 0; i < a.size(); ++i) worst_ep = std::max(worst_ep, static_cast<double>(std::abs(a[i] - c[i])));
  }
  CHECK(worst_ep < 1e-3);  // parameters and AdamW moments (opt.m, opt.v) of the whole model
  // Impossible layouts: every rank ends with the message (exit status non-zero), none hangs.
  auto fails = [&](const std::string& args, const std::string& needle) {
    const std::string cmd = "timeout 60 " + mpirun + kCli + " train" + common + args + " --out " +
                            (scratch() / "dp_bad").string() + " > /dev/null 2> " + (scratch() / "dp.err").string();
    const int status = std::system(cmd.c_str());
    const std::string err = slurp(scratch() / "dp.err");
    INFO(args, "\n", err);
    CHECK((WIFEXITED(status) && WEXITSTATUS(status) != 0 && WEXITSTATUS(status) != 124));
    CHECK(err.find(needle) != std::string::npos);
    CHECK_FALSE(fs::exists(scratch() / "dp_bad" / "checkpoint.safetensors"));
  };
  fails(" --data-parallel 3", "--data-parallel 3 x --expert-parallel 1 = 3 ranks, but 2 ranks");
  fails(" --batch 6", "routing groups of 4 pairs (group_pairs) must tile each rank's 3 pairs");
  expect_failure("train" + common + " --data-parallel 2 --out " + (scratch() / "dp_bad").string(), "but 1 process is running");
  fs::remove_all(scratch());
}
#endif

TEST_CASE("report: an eval.json of the wrong shape, no runs, or a folder in the way of an output are named") {
  const fs::path x = scratch() / "exp_bad";
  fs::remove_all(x);
  auto put = [&](const std::string& arm, const std::string& text) {
    fs::create_directories(x / arm / "seed0");
    std::ofstream(x / arm / "seed0" / "eval.json", std::ios::trunc) << text;
  };
  put("A", R"({"zero_shot_top1": 0.5})");
  put("B", R"({"zero_shot_top1": 0.6, "routing": [{}]})");  // a block with nothing in it reads as zeros
  const Run ok = run("report " + x.string());
  REQUIRE_MESSAGE(ok.code == 0, ok.err);
  std::string before = slurp(x / "report.json");
  for (const auto& [text, needle] : std::vector<std::pair<std::string, std::string>>{
           {R"({"routing": 5})", "\"routing\" must be an array"},
           {R"({"train_seconds": "12"})", "\"train_seconds\" must be a number"},
           {R"({"routing": [{"block": "x"}]})", "\"routing[0].block\" must be an integer"},
           {R"({"routing": [{"img": {"routed": ["x"]}}]})", "\"routing[0].img.routed\" must be an array of numbers"},
           {R"({"routing": [{"image_share": ["a"]}]})", "\"routing[0].image_share\" must be an array of numbers"},
           {R"({"routing": [7]})", "\"routing[0]\" must be an object"}}) {
    put("B", text);
    expect_failure("report " + x.string(), needle);
    CHECK(slurp(x / "report.json") == before);
  }
  // null is a number left undefined (a NaN as nlohmann writes it): read as absent, not refused
  put("B", R"({"zero_shot_top1": null, "train_seconds": null, "routing": [{"block": null, "image_share": [null, 0.5],
              "img": {"drop_rate": null, "routed": [null, 3]}, "txt": {"routed": [1, 2]}}]})");
  const Run with_nulls = run("report " + x.string());
  CHECK_MESSAGE(with_nulls.code == 0, with_nulls.err);
  put("B", R"({"zero_shot_top1": 0.6})");
  REQUIRE(run("report " + x.string()).code == 0);
  before = slurp(x / "report.json");
  // A protocol whose arms have no runs on disk: an error, not an empty report.
  std::ofstream(x / "protocol.txt", std::ios::trunc) << "baseline C\narm C\n";
  expect_failure("report " + x.string(), "no runs under");
  fs::remove(x / "protocol.txt");
  // A folder where report.md goes: nothing of the report is written (before, report.json and the picture were).
  fs::remove(x / "report.md");
  fs::create_directories(x / "report.md");
  expect_failure("report " + x.string(), "report.md': it is a directory");
  CHECK(slurp(x / "report.json") == before);
  for (const auto& e : fs::directory_iterator(x)) CHECK_MESSAGE(e.path().string().find(".tmp.") == std::string::npos, e.path());
  fs::remove_all(x);
}

TEST_CASE("small contracts: bench --config FILE.json by bare name, an integer past 64 bits names its range, a corrupt log line is not carried") {
  const fs::path d = scratch() / "small";
  fs::create_directories(d);
  // a config file named without a folder (no preset name ends in .json)
  const fs::path cfg = d / "cfg.json";
  {
    const Run r = run("inspect tiny --json");
    REQUIRE(r.code == 0);
    std::ofstream(cfg) << nlohmann::json::parse(r.out)["config"].dump();
  }
  const Run b = run_in(d, "bench --workload embed --config cfg.json --batch 2 --repeats 1 --warmup 0 --threads 1");
  REQUIRE_MESSAGE(b.code == 0, b.err);
  CHECK(nlohmann::json::parse(b.out)["width"] == 32);
  // pixels outside [-1, 1] (here 8-bit values) embed, with one warning line on stderr that says so; pixels
  // inside give none
  {
    const std::string ck = kGolden + "tiny_vanilla.ckpt.safetensors";
    const auto in = io::SafetensorsReader::open(kGolden + "tiny_vanilla.io.safetensors");
    const auto info = in.info("images");
    std::vector<float> px = in.read_f32_flat("images");
    for (index_t pass = 0; pass < 2; ++pass) {
      io::SafetensorsWriter w;
      std::vector<float> v = px;
      if (pass == 1)
        for (float& x : v) x = std::round((x + 1.0f) * 127.5f);
      w.add("images", info.shape, std::span<const float>(v));
      const fs::path f = d / "px.safetensors", o = d / "px_out.safetensors";
      w.write(f.string());
      const Run e = run("embed --checkpoint " + ck + " --input " + f.string() + " --output " + o.string());
      REQUIRE_MESSAGE(e.code == 0, e.err);
      CHECK(fs::exists(o));
      CHECK((e.err.find("outside [-1, 1]") != std::string::npos) == (pass == 1));
      if (pass == 1) CHECK(std::count(e.err.begin(), e.err.end(), '\n') == 1);
    }
  }
  // --packed-weights off: the products pack inside every call and keep no copy; the same embeddings within
  // float's sums in another order, a peak memory no larger, and a clear refusal of any other value
  {
    const std::string ck = kGolden + "tiny_map.ckpt.safetensors", in = kGolden + "tiny_map.io.safetensors";
    const fs::path on = d / "pw_on.safetensors", off = d / "pw_off.safetensors";
    REQUIRE(run("embed --checkpoint " + ck + " --input " + in + " --output " + on.string()).code == 0);
    const Run r = run("embed --checkpoint " + ck + " --input " + in + " --output " + off.string() + " --packed-weights off");
    REQUIRE_MESSAGE(r.code == 0, r.err);
    const auto a = io::SafetensorsReader::open(on.string()).read_f32_flat("img_emb");
    const auto b = io::SafetensorsReader::open(off.string()).read_f32_flat("img_emb");
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(std::abs(a[i] - b[i]) < 1e-5f);
    expect_failure("embed --checkpoint " + ck + " --input " + in + " --output " + (d / "pw_x.safetensors").string() +
                   " --packed-weights maybe", "--packed-weights must be on or off, got \"maybe\"");
    const Run bo = run("bench --workload embed --config tiny --batch 2 --repeats 1 --warmup 0 --threads 1 --packed-weights off");
    REQUIRE_MESSAGE(bo.code == 0, bo.err);
    CHECK(nlohmann::json::parse(bo.out)["packed_weights"] == false);
  }
  // gemm times B as it lies and packed once, and reports the faster of the two as its rate
  for (const char* prec : {"fp32", "bf16"}) {
    const Run g = run(std::string("bench --workload gemm --width 64 --tokens 128 --repeats 3 --warmup 0 --threads 1 "
                                  "--precision ") + prec);
    REQUIRE_MESSAGE(g.code == 0, g.err);
    const auto j = nlohmann::json::parse(g.out);
    const double plain = j["gflops_plain"], packed = j["gflops_packed"], best = j["gflops"];
    CHECK(plain > 0);
    CHECK(packed > 0);
    CHECK(best == doctest::Approx(std::max(plain, packed)).epsilon(1e-9));
    CHECK(j["form"] == (packed > plain ? "packed" : "plain"));
  }
  // peak: the machine's ceiling, one repeat; where the processor has no unit for a precision, one line naming that
  for (const char* prec : {"fp32", "bf16"}) {
    const Run k = run(std::string("bench --workload peak --repeats 2 --threads 1 --precision ") + prec);
    INFO(k.err);
    if (k.code == 0) {
      const auto j = nlohmann::json::parse(k.out);
      CHECK(j["unit"] == "GFLOP/s");
      CHECK(j["gflops"].get<double>() > 0);
      CHECK(j["gflops_best"].get<double>() >= j["gflops"].get<double>() * (1 - 1e-12));
      CHECK(j["times_s"].size() == 2);
      const std::string unit = j["kernel"];
      CHECK((std::string(prec) == "fp32" ? (unit == "avx512_fma" || unit == "avx2_fma")
                                         : (unit == "amx_bf16" || unit == "avx512_bf16")));
    } else {
      CHECK(k.code == 2);
      CHECK(k.err.find("unit to measure") != std::string::npos);
    }
  }
  expect_failure("bench --workload peak --config S/32", "drop --config");
  expect_failure("bench --workload peak --backward", "not to peak");
  expect_failure("bench --workload peak --profile", "nothing to break down");
  expect_failure("train --preset tiny --data synthetic --steps 99999999999999999999 --out " + (d / "x").string(),
                 "--steps must be between 1 and 1099511627776, got \"99999999999999999999\"");
  expect_failure("train --preset tiny --data synthetic --seed 99999999999999999999 --out " + (d / "x").string(),
                 "--seed must be between 0 and 9223372036854775807, got \"99999999999999999999\"");
  expect_failure("train --preset tiny --data synthetic --seed -99999999999999999999 --out " + (d / "x").string(),
                 "--seed must be between 0 and 9223372036854775807, got \"-99999999999999999999\"");
  // a line of the log beside a checkpoint that is no step's record is left out of the resumed run's log
  const fs::path r1 = d / "run";
  REQUIRE(run("train --preset tiny --data synthetic --batch 8 --steps 3 --stop-at 2 --quiet --threads 1 --out " + r1.string()).code == 0);
  const std::string log = slurp(r1 / "metrics.jsonl");
  std::ofstream(r1 / "metrics.jsonl", std::ios::trunc) << "not json at all\n" << log;
  REQUIRE(run("train --resume " + (r1 / "checkpoint.safetensors").string() + " --quiet --threads 1 --out " + r1.string()).code == 0);
  const std::string after = slurp(r1 / "metrics.jsonl");
  CHECK(after.substr(0, log.size()) == log);
  CHECK(std::count(after.begin(), after.end(), '\n') == 3);
  fs::remove_all(d);
}

// From a sweep of odd inputs (session 39): what is not a file, a run stopped by a signal, a resume refused after
// the folder holds a log, a checkpoint whose train_state cannot be read, and report's probes and titles.
TEST_CASE("inputs that are not files, a run stopped by a signal, a refused resume, report's probes and titles") {
  const fs::path d = scratch() / "odd";
  fs::create_directories(d);
  const std::string tiny = "train --preset tiny --data synthetic --batch 8 --quiet --threads 1";
  // a device is refused; a named pipe is read once its writer connects, here a second after limoe opened it; a
  // folder is named
  expect_failure("inspect /dev/zero", "it is a device or socket, not a file");
  const fs::path fifo = d / "fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  {
    // limoe in the background, its output in files; the writer a second later; the shell's status limoe's
    auto with_writer = [&](const std::string& args, const std::string& writer) {
      const fs::path o = d / "fifo.out", e = d / "fifo.err";
      const std::string cmd = kCli + " " + args + " > " + o.string() + " 2> " + e.string() + " & (sleep 1; " + writer +
                              " > " + fifo.string() + "); wait $!";
      const int status = std::system(cmd.c_str());
      return Run{WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(o), slurp(e)};
    };
    const Run r = with_writer("inspect " + fifo.string() + " --json", "cat " + kGolden + "tiny_vanilla.ckpt.safetensors");
    CHECK_MESSAGE(r.code == 0, r.err);
    CHECK(nlohmann::json::parse(r.out).contains("config"));
    const Run c = with_writer("train --config " + fifo.string() + " --data synthetic --out " + (d / "x").string(),
                              "printf '{'");
    CHECK(c.code == 2);
    CHECK(c.err.find("not valid JSON") != std::string::npos);
  }
  expect_failure("train --config " + d.string() + " --data synthetic --out " + (d / "x").string(),
                 "it is a directory, not a file");
  expect_failure(tiny + " --data-path /nonexistent --out " + (d / "x").string(), "--data synthetic reads no files");
  expect_failure(tiny + " --batch 99999999999999999999 --out " + (d / "x").string(), "does not fit in a 64-bit integer");
  CHECK_FALSE(fs::exists(d / "x"));

  // SIGINT during training: the run stops after its step (the checkpoint it was writing finished), leaves no
  // temporary file and ends by the signal, as a killed command would; an old temporary file of a process that
  // is not running is cleared by the next run there, a recent one or a live process's is left.
  const fs::path out = d / "sig";
  const std::string cmd = "exec " + kCli + " " + tiny + " --steps 100000 --checkpoint-every 1 --out " + out.string() +
                          " 2> " + (d / "sig.err").string();
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlives this test
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  auto logged = [&] {
    const std::string log = slurp(out / "metrics.jsonl");
    return std::count(log.begin(), log.end(), '\n');
  };
  for (int i = 0; i < 600 && logged() < 3; ++i) ::usleep(100000);
  if (logged() < 3) ::kill(child, SIGKILL);
  REQUIRE(logged() >= 3);  // the loop (and its handler) is running
  REQUIRE(::kill(child, SIGINT) == 0);
  int status = 0;
  pid_t waited = 0;
  for (int i = 0; i < 600 && waited == 0; ++i) {  // at most 60 s: a run that ignores the signal fails, not hangs
    waited = ::waitpid(child, &status, WNOHANG);
    if (waited == 0) ::usleep(100000);
  }
  if (waited == 0) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
    FAIL("train went on after SIGINT");
  }
  INFO(slurp(d / "sig.err"));
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGINT);
  CHECK(slurp(d / "sig.err").find("stopped by signal 2 after step") != std::string::npos);
  for (const auto& e : fs::directory_iterator(out))
    CHECK_MESSAGE(e.path().filename().string().find(".tmp") == std::string::npos, "left behind: ", e.path());
  const fs::path ck = out / "checkpoint.safetensors";
  REQUIRE(fs::exists(ck));
  // process ids: one above any Linux allows (never running), and this test's own
  const fs::path stale = out / "checkpoint.safetensors.tmp.2147483647.0", recent = out / "checkpoint.safetensors.tmp.2147483647.1";
  const fs::path live = out / ("checkpoint.safetensors.tmp." + std::to_string(::getpid()) + ".0");
  for (const fs::path& p : {stale, recent, live}) std::ofstream(p) << "x";
  for (const fs::path& p : {stale, live}) fs::last_write_time(p, fs::file_time_type::clock::now() - std::chrono::hours(1));
  const std::int64_t at = nlohmann::json::parse(io::SafetensorsReader::open(ck.string()).metadata().at("train_state"))["step"];
  const Run r = run("train --resume " + ck.string() + " --stop-at " + std::to_string(at + 1) + " --quiet --out " + out.string());
  REQUIRE_MESSAGE(r.code == 0, r.err);
  CHECK_FALSE(fs::exists(stale));
  CHECK(fs::exists(recent));  // perhaps being written by a run on another machine
  CHECK(fs::exists(live));    // a live process's: not ours to remove
  fs::remove(live), fs::remove(recent);

  // a resume refused for its checkpoint's train_state leaves the folder's .partial as it was, and makes no folder
  {
    auto state = nlohmann::json::parse(io::SafetensorsReader::open(ck.string()).metadata().at("train_state"));
    state["loss_ema"] = "nan";
    const fs::path bad = d / "bad_ema.safetensors";
    with_metadata(ck, bad, {{"train_state", state.dump()}});
    const std::string line = "{\"step\": 1, \"loss\": 1.0}\n";
    std::ofstream(out / "metrics.jsonl.partial", std::ios::trunc) << line;
    expect_failure("train --resume " + bad.string() + " --steps 100000 --out " + out.string(),
                   "train_state \"loss_ema\" must be a finite number");
    CHECK(slurp(out / "metrics.jsonl.partial") == line);
    expect_failure("train --resume " + bad.string() + " --steps 100000 --out " + (d / "fresh").string(), "loss_ema");
    CHECK_FALSE(fs::exists(d / "fresh"));
  }
  // a train_state that is not JSON: eval cannot tell the data and says so, unless --data names it
  {
    const fs::path bad = d / "bad_state.safetensors";
    with_metadata(ck, bad, {{"train_state", "{"}});
    expect_failure("eval --checkpoint " + bad.string() + " --max-test 32", "the data it was trained on is unknown");
    const Run e = run("eval --checkpoint " + bad.string() + " --data synthetic --max-test 32 --threads 1");
    CHECK_MESSAGE(e.code == 0, e.err);
  }
  expect_failure("eval --checkpoint " + ck.string() + " --test-path 'tsv\xff/test.tsv'", "must be a UTF-8 file name");

  // report: every probe's shot count is a column; a title that is not UTF-8 is refused, control characters never
  // reach the pictures' XML
  const fs::path ex = d / "ex";
  for (const auto& [arm, shots] : std::vector<std::pair<std::string, int>>{{"a", 1}, {"b", 3}}) {
    fs::create_directories(ex / arm / "seed0");
    const Run e = run("eval --checkpoint " + ck.string() + " --max-test 64 --threads 1 --shots " + std::to_string(shots));
    REQUIRE_MESSAGE(e.code == 0, e.err);
    std::ofstream(ex / arm / "seed0" / "eval.json") << e.out;
  }
  const Run rep = run("report " + ex.string() + " --title 'a\x01title'");
  REQUIRE_MESSAGE(rep.code == 0, rep.err);
  const std::string md = slurp(ex / "report.md");
  CHECK(md.find("1-shot probe") != std::string::npos);
  CHECK(md.find("3-shot probe") != std::string::npos);
  for (const char* svg : {"accuracy.svg", "routing.svg"}) {
    if (!fs::exists(ex / svg)) continue;
    const std::string s = slurp(ex / svg);
    CHECK(std::none_of(s.begin(), s.end(), [](char c) {
      return static_cast<unsigned char>(c) < 0x20 && c != '\t' && c != '\n' && c != '\r';
    }));
  }
  expect_failure("report " + ex.string() + " --title 'a\xff'", "the title must be UTF-8 text");
  fs::remove_all(d);
}
