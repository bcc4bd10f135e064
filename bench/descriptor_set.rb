# frozen_string_literal: true

# Messages of a descriptor set loaded at run time against the built-in ones: the same
# flowctl.v1 Event (1 KiB payload, metadata, timestamp), once as Flowctl::V1::Event (from
# lib/flowctl/protocols.pb, loaded at require) and once from a copy of its file under another
# package, given to Flowctl.load_descriptor_set here. The target is parity: within 5%.
#
#   ruby bench/descriptor_set.rb                   # timed: median of paired rounds
#   BENCH_PAIRS=31 BENCH_SECONDS=0.1 ruby bench/descriptor_set.rb
#   BENCH_INSTRUCTIONS=1 ruby bench/descriptor_set.rb  # also counts instructions under callgrind
#
# Timed: each row runs the two classes in adjacent short rounds on the thread's CPU clock
# (time the thread was not running is not counted), after a full GC each, in an order that
# alternates pair by pair; the ratio of each pair is taken, and the median over all pairs is
# printed with its spread. Two adjacent rounds see the same machine, so the pair ratio cancels
# what a shared machine does to both; the median drops pairs a collection or a neighbour hit.
#
# Instructions (BENCH_INSTRUCTIONS=1, needs valgrind): each row's work is run N and N + K
# times in a child under `valgrind --tool=callgrind`, and (total(N + K) - total(N)) / K is
# the instructions per op: deterministic, no noise at all.
#
# Built-in here means "compiled into the gem's own descriptor set", not generated C: both
# kinds of class are made by the same loader (lib/flowctl/descriptor_set.rb and
# ext/flowctl/descriptor.c) and run the same C code; this bench checks nothing in the path
# depends on where the descriptor came from.

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"
require "rbconfig"
require "open3"
require_relative "support"

PAIRS = Integer(ENV.fetch("BENCH_PAIRS", "21"))
SECONDS = Float(ENV.fetch("BENCH_SECONDS", "0.1"))

set = Flowctl::Protobuf::FileDescriptorSet.decode(File.binread(File.expand_path("../lib/flowctl/protocols.pb", __dir__)))
copy = set.file.find { |f| f.name == "flowctl/v1/common.proto" }.dup
copy.name = "bench/copy/common.proto"
copy.package = "benchcopy.v1"
copy.message_type.each { |m| m.field.each { |f| f.type_name = f.type_name&.sub(".flowctl.v1.", ".benchcopy.v1.") } }
stamp = set.file.find { |f| f.name == "google/protobuf/timestamp.proto" }
BenchCopy = Module.new
Flowctl.load_descriptor_set(Flowctl::Protobuf::FileDescriptorSet.new(file: [stamp, copy]).to_proto, root: BenchCopy)

CLASSES = { "built-in" => Flowctl::V1::Event, "run-time" => BenchCopy::Benchcopy::V1::Event }.freeze
PAYLOAD = Random.new(1).bytes(1024).freeze
FIELDS = { id: "evt-1", type: "stellar.ledger.v1", payload: PAYLOAD,
           metadata: { "content-type" => "application/octet-stream", "source" => "stellar-live-source" },
           timestamp: Time.at(1_700_000_000, 123_456_789, :nsec),
           source_component_id: "src", content_type: "application/octet-stream" }.freeze

built = CLASSES.transform_values { |k| k.new(**FIELDS) }
BYTES = built["built-in"].to_proto
raise "the run-time copy encodes differently" unless built["run-time"].to_proto == BYTES
raise "the run-time copy decodes differently" unless BenchCopy::Benchcopy::V1::Event.decode(BYTES).to_proto == BYTES

READ = ->(m) { m.id && m.type && m.payload && m.timestamp && m.source_component_id && m.metadata.each { |k, v| k && v } }

# label => {column => work}
WORK = {
  "event 1KiB build" => CLASSES.transform_values { |k| -> { k.new(**FIELDS) } },
  "event 1KiB encode" => built.transform_values { |m| -> { m.to_proto } },
  "event 1KiB decode+read" => CLASSES.transform_values { |k| -> { READ.(k.decode(BYTES)) } },
  "event 1KiB decode+to_h" => CLASSES.transform_values { |k| -> { k.decode(BYTES).to_h } }
}.freeze

# In a child under callgrind: run one row's work n times, then exit.
if (spec = ENV["BENCH_CHILD"])
  label, column, n = spec.split("|")
  work = WORK.fetch(label).fetch(column)
  Integer(n).times { work.call }
  exit!(0)
end

# Operations per CPU-second of the block over about `seconds` of this thread's CPU, after a full GC.
def cpu_ips(seconds, &block)
  GC.start
  iterations, elapsed = Bench.run_for(seconds, clock: Process::CLOCK_THREAD_CPUTIME_ID, &block)
  iterations / elapsed
end

def median(xs) = xs.sort[xs.size / 2]

def instructions(label, column, n)
  env = { "BENCH_CHILD" => [label, column, n].join("|") }
  cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", RbConfig.ruby, __FILE__]
  _out, err, status = Open3.capture3(env, *cmd)
  raise "callgrind failed: #{err.lines.last(5).join}" unless status.success?

  Integer(err[/Collected\s*:\s*(\d+)/, 1] || raise("no instruction count in callgrind's output"))
end

puts "flowctl #{Flowctl::VERSION}, ruby #{RUBY_VERSION}: #{BYTES.bytesize}-byte Event, " \
     "#{PAIRS} pairs of #{SECONDS}s rounds on the thread's CPU clock, median of the pair ratios"
puts format("%-26s  %13s  %13s  %9s  %s", "work", "built-in op/s", "run-time op/s", "ratio", "pair ratios (min-max)")
CLASSES.each_key { |c| WORK.each_value { |w| 2000.times { w[c].call } } } # warm up
outside = []
WORK.each do |label, blocks|
  rates = { "built-in" => [], "run-time" => [] }
  ratios = Array.new(PAIRS) do |i|
    order = i.even? ? %w[built-in run-time] : %w[run-time built-in]
    order.each { |c| rates[c] << cpu_ips(SECONDS, &blocks[c]) }
    rates["run-time"].last / rates["built-in"].last
  end
  r = median(ratios)
  outside << format("%s (%.3fx)", label, r) unless (0.95..1.05).cover?(r)
  puts format("%-26s  %13s  %13s  %8.3fx  %.2f-%.2f", label, Bench.human(median(rates["built-in"])),
              Bench.human(median(rates["run-time"])), r, ratios.min, ratios.max)
end

if ENV["BENCH_INSTRUCTIONS"] == "1"
  timed_outside = outside
  outside = []
  n = 1_000
  k = 10_000
  puts
  puts format("%-26s  %13s  %13s  %9s", "instructions per op", "built-in", "run-time", "speed ratio")
  WORK.each_key do |label|
    per = CLASSES.keys.to_h do |c|
      [c, (instructions(label, c, n + k) - instructions(label, c, n)) / k.to_f]
    end
    r = per["built-in"] / per["run-time"] # as a speed ratio: fewer instructions is faster
    outside << format("%s (%.3fx)", label, r) unless (0.95..1.05).cover?(r)
    puts format("%-26s  %13.0f  %13.0f  %8.3fx", label, per["built-in"], per["run-time"], r)
  end
  puts "(timed: #{timed_outside.empty? ? 'all within 5%' : "outside 5%: #{timed_outside.join(', ')}"}; " \
       "the instruction counts decide)"
end

puts
puts outside.empty? ? "target met: run-time loaded messages within 5% of the built-in ones (ratio = run-time/built-in speed)" :
                      "outside 5%: #{outside.join(', ')}"
