// The C++ runtime this program binds to. PyTorch's wheels link libstdc++'s std::filesystem
// statically into libtorch_cpu.so and export it (142 symbols in torch 2.15), built by another
// compiler than this program's. The dynamic linker binds a symbol to the first library of the
// load order that defines it, so when libtorch_cpu.so precedes libstdc++.so.6 this program's
// std::filesystem calls run the wheel's copy against objects laid out by this program's headers:
// the LibTorch 2.x build's tokenizer tests crashed that way. The build puts libstdc++ first
// (CMakeLists.txt, MIXDIFF_STDCXX_FIRST); this test checks the binding itself, in any build.
#include <gtest/gtest.h>

#include <dlfcn.h>

#include <filesystem>
#include <string>

namespace mixdiff {
namespace {

TEST(UnitAbi, StdFilesystemCallsBindToLibstdcxx) {
  // std::filesystem functions this project calls that libtorch_cpu.so 2.x also exports.
  const char* names[] = {
      "_ZNKSt10filesystem7__cxx1118directory_iteratordeEv",
      "_ZNKSt10filesystem7__cxx114path7compareERKS1_",
      "_ZNKSt10filesystem7__cxx114path11parent_pathEv",
      "_ZNKSt10filesystem7__cxx114path5_List3endEv",
      "_ZNSt10filesystem18create_directoriesERKNS_7__cxx114pathE",
      "_ZNSt10filesystem10remove_allERKNS_7__cxx114pathE",
      "_ZNSt10filesystem6statusERKNS_7__cxx114pathE",
      "_ZNSt10filesystem6renameERKNS_7__cxx114pathES3_",
  };
  int found = 0;
  for (const char* name : names) {
    void* p = dlsym(RTLD_DEFAULT, name);
    if (!p) continue;
    ++found;
    Dl_info info{};
    ASSERT_NE(dladdr(p, &info), 0) << name;
    const std::string lib = info.dli_fname ? info.dli_fname : "";
    EXPECT_NE(lib.find("libstdc++"), std::string::npos)
        << name << " binds to " << lib << ", not libstdc++: link libstdc++ before LibTorch";
  }
  EXPECT_GE(found, 4) << "libstdc++ should export these std::filesystem functions";
  // And the calls work: a directory made, listed and removed through them.
  const auto d = std::filesystem::temp_directory_path() / "mixdiff_abi_test";
  std::filesystem::create_directories(d / "a" / "b");
  int entries = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(d)) {
    entries += e.path().lexically_normal().compare(d) != 0 ? 1 : 0;
  }
  EXPECT_EQ(entries, 2);
  EXPECT_EQ(std::filesystem::remove_all(d), 3u);
}

}  // namespace
}  // namespace mixdiff
