#include <algorithm>
// Checkpoints (docs/cli.md, docs/cli.md): a saved model reads back bit for bit with its config and
// optimizer state; a checkpoint with a missing, misshaped or non-finite tensor, or another format or version,
// is rejected with an error naming the file, the tensor and the problem.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <unistd.h>

#include "limoe/model/checkpoint.hpp"
#include "limoe/model/model.hpp"
#include "limoe/model/presets.hpp"
#include "limoe/train/optimizer.hpp"

using namespace limoe;
namespace fs = std::filesystem;

namespace {
std::string temp_path(const std::string& name) {
  return (fs::temp_directory_path() / ("limoe_test_ckpt_" + std::to_string(::getpid()) + "_" + name)).string();
}

// Writes every parameter of `m` by hand (not through save_checkpoint), letting `edit` change one tensor.
template <class Edit>
io::SafetensorsReader hand_written(const Limoe<float>& m, Edit edit, std::string format = "limoe",
                                   std::string version = "1") {
  io::SafetensorsWriter w;
  const auto& ps = m.params();
  for (const auto& e : ps.entries()) {
    const auto v = ps.value(ps.get(e.name));
    std::vector<float> buf(v.data(), v.data() + v.numel());
    std::vector<std::int64_t> shape(e.shape.begin(), e.shape.end());
    if (!edit(e.name, shape, buf)) continue;  // false: leave the tensor out
    w.add(e.name, shape, std::span<const float>(buf));
  }
  w.set_metadata("format", format);
  w.set_metadata("format_version", version);
  w.set_metadata("config", to_json(m.config()).dump());
  const std::string path = temp_path("hand.safetensors");
  w.write(path);
  auto r = io::SafetensorsReader::open(path, io::SafetensorsReader::Load::Read);
  fs::remove(path);
  return r;
}

// load_weights' error on `r` ("" when it loads); check_weights (what `limoe inspect` runs, without a model) must
// refuse the same files with the same words.
std::string load_error(const io::SafetensorsReader& r) {
  std::string loaded, checked;
  try {
    Limoe<float> m(read_checkpoint_config(r));
    load_weights(m, r);
  } catch (const Error& e) {
    loaded = e.what();
  }
  try {
    check_weights(Limoe<float>::parameter_entries(read_checkpoint_config(r)), r);
  } catch (const Error& e) {
    checked = e.what();
  }
  CHECK(checked == loaded);
  return loaded;
}
}  // namespace

TEST_CASE("save_checkpoint -> read: every tensor bit for bit, the config, the optimizer moments and step") {
  Limoe<float> m(preset("tiny"));
  m.init(5);
  AdamW<float> opt(AdamWConfig{}, m.params());
  for (index_t i = 0; i < opt.m().numel(); ++i) opt.m()[i] = 0.25f * static_cast<float>(i % 7), opt.v()[i] = 1e-3f * static_cast<float>(i % 5);
  opt.set_step(42);
  const std::string path = temp_path("roundtrip.safetensors");
  save_checkpoint(m, path, TrainState<float>{&opt, R"({"step": 42})"});
  const auto r = io::SafetensorsReader::open(path);
  CHECK(r.metadata().at("format") == "limoe");
  CHECK(r.metadata().at("format_version") == "1");
  const ModelConfig cfg = read_checkpoint_config(r);
  CHECK(to_json(cfg) == to_json(m.config()));
  Limoe<float> back(cfg);
  load_weights(back, r);
  REQUIRE(back.params().size() == m.params().size());
  for (index_t i = 0; i < m.params().size(); ++i) REQUIRE(back.params().values()[i] == m.params().values()[i]);
  AdamW<float> opt2(AdamWConfig{}, back.params());
  REQUIRE(load_optimizer(opt2, r));
  CHECK(opt2.step() == 42);
  for (index_t i = 0; i < opt.m().numel(); ++i) {
    REQUIRE(opt2.m()[i] == opt.m()[i]);
    REQUIRE(opt2.v()[i] == opt.v()[i]);
  }
  fs::remove(path);
}

TEST_CASE("optimizer state: a checkpoint without it loads nothing; a wrong size or step is named") {
  Limoe<float> m(preset("tiny"));
  AdamW<float> opt(AdamWConfig{}, m.params());
  const std::string bare = temp_path("bare.safetensors");
  save_checkpoint(m, bare);
  CHECK_FALSE(opt.load_state(io::SafetensorsReader::open(bare)));
  fs::remove(bare);
  auto error = [&](index_t n, const std::string& step, float m0 = 0.5f, float v0 = 0.5f) {
    io::SafetensorsWriter w;
    std::vector<float> z(static_cast<std::size_t>(n), 0.5f), zm = z, zv = z;
    if (n > 0) zm[0] = m0, zv[0] = v0;
    w.add("opt.m", {n}, std::span<const float>(zm));
    w.add("opt.v", {n}, std::span<const float>(zv));
    w.set_metadata("opt_step", step);
    const std::string p = temp_path("opt.safetensors");
    w.write(p);
    std::string msg;
    try {
      opt.load_state(io::SafetensorsReader::open(p));
    } catch (const Error& e) {
      msg = e.what();
    }
    fs::remove(p);
    return msg;
  };
  const index_t n = m.params().size();
  CHECK(error(n - 1, "3").find("opt.m has " + std::to_string(n - 1) + " values for " + std::to_string(n)) != std::string::npos);
  CHECK(error(n, "three").find("opt_step \"three\" is not a step count") != std::string::npos);
  CHECK(error(n, "-2").find("is not a step count") != std::string::npos);
  // Moments AdamW cannot have left: they would make the next step's weights NaN.
  CHECK(error(n, "3", std::nanf("")).find("opt.m holds nan at 0") != std::string::npos);
  CHECK(error(n, "3", 0.5f, -1.0f).find("opt.v holds -1 at 0") != std::string::npos);
  CHECK(error(n, "3", 0.5f, INFINITY).find("opt.v holds inf") != std::string::npos);
  CHECK(opt.step() == 0);  // nothing changed by the failed loads
  CHECK(error(n, "7").empty());
  CHECK(opt.step() == 7);
  CHECK(opt.m()[0] == 0.5f);
}

TEST_CASE("optimizer state: opt_order names the moments' layout; another program's order is read by name") {
  Limoe<float> m(preset("tiny"));
  const auto& entries = m.params().entries();
  // What limoe writes: the store's order, listed.
  {
    AdamW<float> opt(AdamWConfig{}, m.params());
    const std::string p = temp_path("order.safetensors");
    save_checkpoint(m, p, TrainState<float>{&opt, "{}"});
    const auto order = nlohmann::json::parse(io::SafetensorsReader::open(p).metadata().at("opt_order"));
    REQUIRE(order.size() == entries.size());
    for (std::size_t i = 0; i < entries.size(); ++i) CHECK(order[i].get<std::string>() == entries[i].name);
    fs::remove(p);
  }
  // Another program's file: the moments in name order (as its tensors are sorted), each value naming its tensor
  // and position, so a moment read from the wrong place shows.
  std::vector<std::size_t> by_name(entries.size());
  for (std::size_t i = 0; i < by_name.size(); ++i) by_name[i] = i;
  std::sort(by_name.begin(), by_name.end(), [&](std::size_t a, std::size_t b) { return entries[a].name < entries[b].name; });
  REQUIRE(by_name != [&] { auto v = by_name; std::sort(v.begin(), v.end()); return v; }());  // a different order
  auto value = [](std::size_t e, index_t i) { return static_cast<float>(e) + 1e-3f * static_cast<float>(i % 997); };
  // The whole model's moments in name order, with `order_text` as opt_order.
  auto write_moments = [&](const std::string& order_text) {
    io::SafetensorsWriter w;
    std::vector<float> mv, vv;
    for (std::size_t k : by_name)
      for (index_t i = 0; i < entries[k].shape.numel(); ++i) mv.push_back(value(k, i)), vv.push_back(2 * value(k, i));
    w.add("opt.m", {static_cast<std::int64_t>(mv.size())}, std::span<const float>(mv));
    w.add("opt.v", {static_cast<std::int64_t>(vv.size())}, std::span<const float>(vv));
    w.set_metadata("opt_order", order_text);
    const std::string p = temp_path("order_in.safetensors");
    w.write(p);
    return p;
  };
  auto load = [&](nlohmann::json order) {
    const std::string p = write_moments(order.is_string() ? order.get<std::string>() : order.dump());
    AdamW<float> opt(AdamWConfig{}, m.params());
    std::string msg;
    try {
      if (!opt.load_state(io::SafetensorsReader::open(p))) msg = "no state";
    } catch (const Error& e) {
      msg = e.what();
    }
    fs::remove(p);
    if (msg.empty())
      for (std::size_t k = 0; k < entries.size(); ++k)
        for (index_t i = 0; i < entries[k].shape.numel(); ++i) {
          REQUIRE(opt.m()[entries[k].offset + i] == value(k, i));
          REQUIRE(opt.v()[entries[k].offset + i] == 2 * value(k, i));
        }
    return msg;
  };
  nlohmann::json sorted = nlohmann::json::array();
  for (std::size_t k : by_name) sorted.push_back(entries[k].name);
  CHECK(load(sorted).empty());
  // Errors name the problem: not an array, a name not in the model, a name twice, one left out.
  CHECK(load(nlohmann::json("{\"a\": 1}")).find("opt_order (the order of opt.m and opt.v: a JSON array of the parameters' names) is not a JSON array") != std::string::npos);
  CHECK(load(nlohmann::json("[1, 2")).find("is not a JSON array") != std::string::npos);
  {  // Expert parallel: a model holding part 1 of 2 of each expert tensor reads its part of the whole tensor from
     // where opt_order puts that tensor (the file's moments are the whole model's, in name order here).
    Limoe<float> half(preset("tiny"), ConfigRouter{}, ExpertShard{1, 2});
    const std::string p = write_moments(sorted.dump());
    AdamW<float> opt(AdamWConfig{}, half.params());
    REQUIRE(opt.load_state(io::SafetensorsReader::open(p)));
    fs::remove(p);
    int sharded = 0;
    for (const auto& e : half.params().entries()) {
      const auto k = static_cast<std::size_t>(std::find_if(entries.begin(), entries.end(), [&](const auto& w) { return w.name == e.name; }) - entries.begin());
      REQUIRE(k < entries.size());
      sharded += e.shards > 1;
      for (index_t i = 0; i < e.shape.numel(); ++i) REQUIRE(opt.m()[e.offset + i] == value(k, e.shard * e.shape.numel() + i));
    }
    CHECK(sharded == 4);  // the MoE block's fc1/fc2 weights and biases
  }
  auto with = [&](auto edit) { nlohmann::json o = sorted; edit(o); return load(o); };
  CHECK(with([](auto& o) { o[0] = 7; }).find("holds 7, not a name") != std::string::npos);
  CHECK(with([](auto& o) { o[0] = "blocks.9.ln1.weight"; }).find("names \"blocks.9.ln1.weight\", which this model does not have") != std::string::npos);
  CHECK(with([](auto& o) { o[1] = o[0]; }).find("twice") != std::string::npos);
  CHECK(with([](auto& o) { o.erase(o.size() - 1); }).find("leaves out \"" + entries[by_name.back()].name + "\"") != std::string::npos);
}

TEST_CASE("bad checkpoints: missing, misshaped or non-finite tensors; another format or version") {
  Limoe<float> m(preset("tiny"));
  m.init(6);
  const std::string victim = "blocks.0.ln1.weight";
  REQUIRE_NOTHROW(m.params().get(victim));

  // Unchanged: loads, and the values are the hand-written ones.
  const auto good = hand_written(m, [](const std::string&, auto&, auto&) { return true; });
  CHECK(load_error(good).empty());

  std::string e = load_error(hand_written(m, [&](const std::string& n, auto&, auto&) { return n != victim; }));
  CHECK_MESSAGE(e.find("missing tensor \"" + victim + "\"") != std::string::npos, e);

  e = load_error(hand_written(m, [&](const std::string& n, auto& shape, auto& buf) {
    if (n == victim) shape = {static_cast<std::int64_t>(buf.size()) / 2, 2};
    return true;
  }));
  CHECK_MESSAGE(e.find(victim) != std::string::npos, e);
  CHECK_MESSAGE(e.find("shape") != std::string::npos, e);

  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    e = load_error(hand_written(m, [&](const std::string& n, auto&, auto& buf) {
      if (n == victim) buf[3] = bad;
      return true;
    }));
    CHECK_MESSAGE(e.find("non-finite") != std::string::npos, e);
    CHECK_MESSAGE(e.find(victim) != std::string::npos, e);
  }

  e = load_error(hand_written(m, [](const std::string&, auto&, auto&) { return true; }, "other"));
  CHECK_MESSAGE(e.find("format is \"other\"") != std::string::npos, e);
  e = load_error(hand_written(m, [](const std::string&, auto&, auto&) { return true; }, "limoe", "2"));
  CHECK_MESSAGE(e.find("format_version \"2\"") != std::string::npos, e);
}

TEST_CASE("a config's parameter list without a model: the names, shapes, offsets and shards the model registers") {
  ModelConfig two = preset("tiny");
  two.towers = 2;
  two.moe_blocks.clear();
  struct Case {
    ModelConfig cfg;
    ExpertShard shard;
  };
  for (const auto& [cfg, shard] : {Case{preset("tiny"), {}}, Case{preset("S/32"), {}}, Case{two, {}},
                                    Case{preset("tiny"), ExpertShard{1, 2}}}) {
    const Limoe<float> m(cfg, ConfigRouter{}, shard);
    const auto list = Limoe<float>::parameter_entries(cfg, shard);
    const auto& want = m.params().entries();
    REQUIRE(list.size() == want.size());
    for (std::size_t i = 0; i < list.size(); ++i) {
      CAPTURE(want[i].name);
      CHECK(list[i].name == want[i].name);
      CHECK(list[i].shape == want[i].shape);
      CHECK(list[i].offset == want[i].offset);
      CHECK(list[i].decay == want[i].decay);
      CHECK((list[i].shard == want[i].shard && list[i].shards == want[i].shards));
    }
  }
}

TEST_CASE("a scalar stored as [1] loads like one stored as []") {
  Limoe<float> m(preset("tiny"));
  m.init(7);
  const auto r = hand_written(m, [](const std::string& n, auto& shape, auto&) {
    if (n == "logit_scale") shape = {1};
    return true;
  });
  Limoe<float> back(read_checkpoint_config(r));
  load_weights(back, r);
  CHECK(back.params().value(back.params().get("logit_scale"))[0] == m.params().value(m.params().get("logit_scale"))[0]);
}

TEST_CASE("compatibility: a checkpoint written by the previous version loads and gives its embeddings and routes") {
  // tests/data/compat/ (tests/reference/make_compat.sh): the tiny preset trained 4 steps by limoe at commit
  // b34f3dd (before the backend-as-a-type redesign), a batch, and that program's `limoe embed` output.
  const std::string dir = std::string(LIMOE_TEST_DATA_DIR) + "/compat/";
  const auto ckpt = io::SafetensorsReader::open(dir + "v1_tiny.safetensors");
  Limoe<float> m(read_checkpoint_config(ckpt));
  load_weights(m, ckpt);
  const auto batch = io::SafetensorsReader::open(dir + "v1_batch.safetensors");
  const auto want = io::SafetensorsReader::open(dir + "v1_emb.safetensors");
  const std::vector<float> px = batch.read_f32_flat("images");
  const Shape is = batch.shape("images"), ts = batch.shape("texts");
  Tensor<float> images(is);
  std::copy(px.begin(), px.end(), images.data());
  Tensor<std::int32_t> texts(ts);
  const auto ids = batch.read_i32_flat("texts");
  std::copy(ids.begin(), ids.end(), texts.data());
  // `limoe embed` embeds images and texts in two separate evaluation calls.
  const auto fi = m.forward(images.cview(), CView<std::int32_t>{}, Mode::Eval);
  const auto ft = m.forward(CView<float>{}, texts.cview(), Mode::Eval);
  auto close = [](const Tensor<float>& got, const std::vector<float>& ref) {
    REQUIRE(static_cast<std::size_t>(got.numel()) == ref.size());
    double worst = 0;
    for (index_t i = 0; i < got.numel(); ++i)
      worst = std::max(worst, std::abs(static_cast<double>(got[i]) - ref[static_cast<std::size_t>(i)]));
    return worst;
  };
  // Its training state loads too (a run resumes across the versions).
  AdamW<float> opt(AdamWConfig{}, m.params());
  REQUIRE(load_optimizer(opt, ckpt));
  CHECK(opt.step() == 4);
  CHECK(close(fi.img_emb, want.read_f32_flat("img_emb")) < 1e-5);
  CHECK(close(ft.txt_emb, want.read_f32_flat("txt_emb")) < 1e-5);
  for (std::size_t r = 0; r < fi.routes.size(); ++r) {
    const auto b = std::to_string(fi.route_blocks[r]);
    const auto ri = want.read_i32_flat("img_route." + b), rt = want.read_i32_flat("txt_route." + b);
    REQUIRE(static_cast<std::size_t>(fi.routes[r].numel()) == ri.size());
    REQUIRE(static_cast<std::size_t>(ft.routes[r].numel()) == rt.size());
    for (std::size_t i = 0; i < ri.size(); ++i) CHECK(fi.routes[r][static_cast<index_t>(i)] == ri[i]);
    for (std::size_t i = 0; i < rt.size(); ++i) CHECK(ft.routes[r][static_cast<index_t>(i)] == rt[i]);
  }
}
