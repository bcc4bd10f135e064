# frozen_string_literal: true

# A tiny timing helper shared by the benchmarks in bench/: it measures how many times per
# second a block runs, for a few seconds, and prints a table with one column per
# implementation and the ratio of the first to the second.
#
#   require_relative "support"
#   table = Bench::Table.new("flowctl", "google")
#   table.row("encode heartbeat", flowctl: -> { a.to_proto }, google: -> { B.encode(b) })
#   table.print
#
# BENCH_SECONDS (default 0.5) sets how long each block runs per round and BENCH_ROUNDS
# (default 3) how many rounds are taken (the best counts); the machine is shared, so keep it
# short. Ratios > 1.0 mean the first column is faster.
module Bench
  SECONDS = Float(ENV.fetch("BENCH_SECONDS", "0.5"))
  # Each block is measured this many times, alternating with the other columns, and the
  # best round counts: on a shared machine noise only ever slows a round down.
  ROUNDS = Integer(ENV.fetch("BENCH_ROUNDS", "3"))
  WARMUP = [SECONDS / 5, 0.2].min

  module_function

  def now(clock = Process::CLOCK_MONOTONIC) = Process.clock_gettime(clock)

  # Iterations per second of the block, run for about `seconds` after a short warm-up.
  # The block is called in batches so that reading the clock costs nothing measurable.
  def ips(seconds = SECONDS, &block)
    raise ArgumentError, "Bench.ips needs a block" unless block

    run_for(WARMUP, &block)
    iterations, elapsed = run_for(seconds, &block)
    iterations / elapsed
  end

  # Runs the block in growing batches until `seconds` have passed on `clock` (elapsed time,
  # or Process::CLOCK_THREAD_CPUTIME_ID for this thread's CPU): [iterations, elapsed].
  def run_for(seconds, clock: Process::CLOCK_MONOTONIC, &block)
    batch = 1
    iterations = 0
    start = now(clock)
    loop do
      i = 0
      while i < batch
        block.call
        i += 1
      end
      iterations += batch
      elapsed = now(clock) - start
      return [iterations, elapsed] if elapsed >= seconds

      batch *= 2 if elapsed < seconds / 20
    end
  end

  # In a benchmark's server subprocess: tells the driver the port (a line on stdout), serves
  # until the driver closes our stdin, then stops the server and exits.
  def serve_until_stdin_closes(port, stop)
    $stdout.puts port
    $stdout.flush
    $stdin.read
    stop.call
    exit 0
  end

  # "1.23M", "456.7k", "89.0"
  def human(rate)
    if rate >= 1_000_000 then format("%.2fM", rate / 1_000_000.0)
    elsif rate >= 1_000 then format("%.1fk", rate / 1_000.0)
    else format("%.1f", rate)
    end
  end

  # A result table: one row per piece of work, one column per implementation (ops/s), and
  # the ratio of the first implementation to the second.
  class Table
    Row = Struct.new(:label, :rates)

    attr_reader :columns, :rows

    def initialize(*columns, seconds: SECONDS, rounds: ROUNDS, io: $stdout)
      raise ArgumentError, "a table needs at least one column" if columns.empty?

      @columns = columns.map(&:to_s)
      @seconds = seconds
      @rounds = rounds
      @io = io
      @rows = []
    end

    # Measures each block (keyed by column name) and records the row; prints it at once
    # when `live` so a long run shows progress. Returns {column => ops/s}.
    def row(label, live: true, **blocks)
      missing = @columns - blocks.keys.map(&:to_s)
      raise ArgumentError, "row #{label.inspect} lacks #{missing.join(', ')}" unless missing.empty?

      @io.puts(header) if live && @rows.empty?
      rates = @columns.to_h { |c| [c, 0.0] }
      @rounds.times do
        @columns.each { |c| rates[c] = [rates[c], Bench.ips(@seconds, &blocks.fetch(c.to_sym))].max }
      end
      @rows << Row.new(label, rates)
      @io.puts(format_row(@rows.last)) if live
      rates
    end

    # The ratio columns[0] / columns[1] of a row (nil with a single column).
    def ratio(row)
      return nil if @columns.size < 2

      row.rates[@columns[0]] / row.rates[@columns[1]]
    end

    def header
      cells = [format("%-#{label_width}s", "work")] + @columns.map { |c| format("%12s", "#{c} op/s") }
      cells << format("%#{ratio_width}s", ratio_title) if @columns.size >= 2
      cells.join("  ")
    end

    def format_row(row)
      cells = [format("%-#{label_width}s", row.label)]
      cells += @columns.map { |c| format("%12s", Bench.human(row.rates[c])) }
      cells << format("%#{ratio_width - 1}.2fx", ratio(row)) if @columns.size >= 2
      cells.join("  ")
    end

    def print
      @io.puts header
      @io.puts "-" * header.size
      @rows.each { |r| @io.puts format_row(r) }
    end

    private

    def label_width = 34
    def ratio_title = "#{@columns[0]}/#{@columns[1]}"
    def ratio_width = [ratio_title.size, 10].max
  end
end
