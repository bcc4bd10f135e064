# frozen_string_literal: true

require "spec_helper"
require "etc"

# The stall watch (server_engine.c, 2c) shuts the busiest connection when gRPC holds the
# acceptor inside grpc_completion_queue_next, working on something that is no call (an HTTP/2
# rapid reset flood: spec/hostile_server_spec.rb). On a saturated machine the acceptor can
# also be late only because it waits for a CPU; then its connections carry good calls, and
# shutting one loses every call in flight on it (a burst of 10,000 registrations lost 20 at
# load 9.8). Here the acceptor thread is starved on purpose: SCHED_IDLE, pinned to a CPU that
# four busy processes keep busy, so it comes back from gRPC every 0.6-0.8 s with about 1 ms
# of CPU in between. Every call must still succeed, and no connection may be shut.
RSpec.describe "Flowctl::Server with a starved acceptor" do
  def starving_tools? = %w[chrt taskset].all? { |t| system("command -v #{t} > /dev/null 2>&1") }

  def acceptor_threads = Dir["/proc/self/task/*"].select { |t| thread_name(t) == "flowctl-accept" }

  def thread_name(task)
    File.read(File.join(task, "comm")).strip
  rescue SystemCallError
    nil # the thread ended meanwhile
  end

  def starve(task, cpu)
    tid = File.basename(task)
    system("taskset", "-p", "-c", cpu.to_s, tid, out: File::NULL, exception: true)
    system("chrt", "--idle", "-p", "0", tid, exception: true)
  end

  def unstarve(task)
    tid = File.basename(task)
    system("chrt", "--other", "-p", "0", tid, out: File::NULL, err: File::NULL)
    system("taskset", "-p", "-c", "0-#{Etc.nprocessors - 1}", tid, out: File::NULL, err: File::NULL)
  end

  it "loses no call and shuts no connection while its acceptor waits for a CPU" do
    skip "needs chrt and taskset (util-linux)" unless starving_tools?
    skip "needs two CPUs (one is kept busy)" if Etc.nprocessors < 2
    skip "valgrind runs one thread at a time: a SCHED_IDLE one would hold up all" if ENV["FLOWCTL_MEMCHECK"]

    registry = Flowctl::ControlPlane::Registry.new(janitor_interval: nil)
    echo = Object.new
    def echo.process(events, call) = events.each { |e| call.write(e) }
    before = acceptor_threads
    server = Flowctl::Server.new(port: 0, tls: false, pool_size: 16, max_waiting: 4096, max_wait: 5.0) # Registry#serve's
    server.handle(Flowctl::ControlPlane::Service, registry)
    server.handle(Flowctl::V1::ProcessorService, echo)
    server.start
    mine = acceptor_threads - before
    expect(mine.size).to eq(1), "the server's acceptor thread is named flowctl-accept (found #{mine.size} new)"
    target = "127.0.0.1:#{server.port}"
    # a stream that is already open keeps its connection the busiest: the one a stall verdict shuts
    streamer = Flowctl::V1::ProcessorClient.new(target, tls: false, timeout: 60)
    clients = Array.new(2) { Flowctl::ControlPlane::Client.new(target, tls: false, timeout: 60) }
    expect(clients.first.register_processor(processor_id: "warm").success).to be(true)
    busy = Array.new(4) { Process.spawn("taskset", "-c", "0", "sh", "-c", "while :; do :; done") }
    starve(mine.first, 0)
    until_at = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 4 # several of the watch's 0.6 s windows
    going = -> { Process.clock_gettime(Process::CLOCK_MONOTONIC) < until_at }
    sent = 0
    input = Enumerator.new { |y| y << Flowctl::V1::Event.new(id: (sent += 1).to_s, type: "t") while going.call }
    echoed = Thread.new do
      Thread.current.report_on_exception = false # its error fails the example at #value
      streamer.process(input).count
    end
    errors = Queue.new
    done = Queue.new
    threads = Array.new(16) do |t|
      Thread.new do
        i = 0
        while going.call
          clients[t % 2].register_processor(processor_id: "p#{t}-#{i}", endpoint: "h:#{i}")
          done << 1
          i += 1
        end
      rescue Flowctl::RPCError => e
        errors << e
      end
    end
    threads.each(&:join)
    expect(echoed.value).to eq(sent)
    expect(errors.size).to eq(0), -> { "#{errors.size} calls failed, first: #{errors.pop.inspect}" }
    expect(server.stats[:stall_closed]).to eq(0)
    expect(registry.size).to eq(done.size + 1)
    expect(done.size).to be >= (ENV["GC_STRESS"] == "1" ? 1 : 16)
  ensure
    busy&.each do |pid|
      Process.kill(:KILL, pid)
      Process.wait(pid)
    end
    unstarve(mine.first) if mine&.first
    [streamer, *clients].each { |c| c&.close }
    server&.stop
    registry&.close
  end
end
