# frozen_string_literal: true

# What an acknowledgement costs in the pipeline runner's pending lists (ext/flowctl/pending.c,
# Flowctl::Native::Pending), by where its id is in the list: the oldest (a processor that keeps
# ids and answers in order), nowhere (one that renames events: the list fills to the Router's
# REPLAY_LIMIT and every reply looks for an id it never finds; or one that fans an event out
# into several replies with its id: the first acknowledges it, the others find nothing) and just
# behind the oldest (one that drops some events). A relay does this on the
# producer's thread for every reply. Single-threaded, no gRPC: the list alone.
#
#   ruby bench/pending_ack.rb        # BENCH_N acknowledgements a case (default 20000)
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"
require "flowctl/pipeline"

module PendingAckBench
  N = Integer(ENV.fetch("BENCH_N", "20000"))
  LIMIT = Flowctl::Pipeline::Router::REPLAY_LIMIT
  EVENT = Flowctl::V1::Event

  module_function

  def bytes(id) = EVENT.new(id: id, type: "t", payload: "x" * 100).to_proto
  def clock = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  def per_ack(list, ids)
    t0 = clock
    ids.each { |id| list.ack(id) }
    (clock - t0) / ids.size * 1e6
  end

  def run
    head = Flowctl::Native::Pending.new(EVENT, LIMIT)
    pushed = Array.new(N) { |i| bytes("e#{i}") }
    t0 = clock
    N.times do |i|
      head.push(pushed[i])
      head.ack("e#{i}")
    end
    in_order = (clock - t0) / N * 1e6

    full = Flowctl::Native::Pending.new(EVENT, LIMIT)
    LIMIT.times { |i| full.push(bytes("e#{i}")) }
    renamed = per_ack(full, Array.new(N) { |i| "renamed-#{i}" })

    deep = Flowctl::Native::Pending.new(EVENT, LIMIT)
    LIMIT.times { |i| deep.push(bytes("e#{i}")) }
    behind = per_ack(deep, (1...LIMIT).step(2).first(N).map { |i| "e#{i}" }) # each drops the oldest and itself

    puts format("pending list (limit %d), µs per acknowledgement:", LIMIT)
    puts format("  push + ack of the oldest (ids kept, in order)  %.2f", in_order)
    puts format("  an id not in a full list (renamed ids, or a    %.2f", renamed)
    puts "    fan-out's second reply: its id already acknowledged)"
    puts format("  an id one behind the oldest (a filtered event) %.2f", behind)
  end
end

PendingAckBench.run if $PROGRAM_NAME == __FILE__
