# frozen_string_literal: true

# The gem's lib directory, for the specs that run Ruby in a child process.
FLOWCTL_LIB = File.expand_path("../lib", __dir__)
$LOAD_PATH.unshift FLOWCTL_LIB
require "flowctl"

# GC safety is part of the normal suite: every object the extension keeps must survive
# compaction, and GC_STRESS=1 runs the whole suite with GC.stress on.
if GC.respond_to?(:verify_compaction_references) && ENV["FLOWCTL_NO_COMPACTION"] != "1"
  RSpec.configure do |c|
    c.before(:suite) { GC.verify_compaction_references(double_heap: true, toward: :empty) }
    c.after(:suite) { GC.verify_compaction_references(double_heap: true, toward: :empty) }
  end
  # Ruby 3.1's GC.compact reads one VM stack slot past each thread's top, which may name an object
  # on a heap page freed since: a segfault that no extension causes (docs/internals.md, "Ruby 3.1
  # and GC.compact"). script/test and rake keep heap pages for the specs; plain rspec is told.
  if RUBY_VERSION.start_with?("3.1.") && !ENV["RUBY_GC_HEAP_FREE_SLOTS_MAX_RATIO"]
    warn "spec_helper: Ruby #{RUBY_VERSION}'s GC.compact can crash once a heap page is freed while threads run; " \
         "script/test and rake set RUBY_GC_HEAP_FREE_SLOTS_MAX_RATIO=1.0 (docs/internals.md)"
  end
end

# Elapsed-time limits: GC.stress makes every allocation a full GC, and valgrind (rake
# memcheck) slows everything as much, so there what must happen "at once" gets twenty
# times as long (the specs check memory safety then).
module FlowctlTiming
  def time_limit(seconds) = ENV["GC_STRESS"] == "1" || ENV["FLOWCTL_MEMCHECK"] ? seconds * 20 : seconds
end

RSpec.configure do |c|
  c.include FlowctlTiming
  c.disable_monkey_patching!
  c.order = :random
  Kernel.srand c.seed
  c.example_status_persistence_file_path = "spec/examples.txt"
  if ENV["GC_STRESS"] == "1"
    c.around(:each) do |ex|
      GC.stress = true
      ex.run
    ensure
      GC.stress = false
    end
  end
end

Dir[File.join(__dir__, "support", "**", "*.rb")].sort.each { |f| require f }
